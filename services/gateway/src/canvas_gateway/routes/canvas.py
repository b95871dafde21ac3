"""Canvases: the objects completed jobs drew on them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from canvas_gateway.deps import CurrentUser, StoreDep
from canvas_gateway.routes import error_responses
from canvas_gateway.schemas import CANVAS_ID_PATTERN, CanvasObjectsPublic

router = APIRouter(prefix="/api/canvas", tags=["canvas"])


@router.get(
    "/{canvas_id}/objects",
    summary="The objects on a canvas",
    description="Objects of completed jobs, oldest first; empty while the caller's first "
    "job on it runs. Another user's canvas answers 404, like a missing one.",
    responses=error_responses(401, 404, 422, 503),
)
async def canvas_objects(
    canvas_id: Annotated[str, Path(pattern=CANVAS_ID_PATTERN)],
    user: CurrentUser,
    store: StoreDep,
) -> CanvasObjectsPublic:
    objects = await store.canvas_objects(user.user_id, canvas_id)
    if objects is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="canvas not found")
    return CanvasObjectsPublic(canvas_id=canvas_id, objects=objects)
