"""docker-compose.yml, checked without a Docker engine (none runs on these machines):
against the Compose Specification's JSON schema, which check-jsonschema ships
(check_jsonschema/builtin_schemas/vendor/compose-spec.json, pinned by the lock), and for
what canvas-jobs needs of it: healthchecks, restart policies, start order, ports, the
stand-in model's profile, and the settings of docs/settings.md with defaults that each
service's own Settings class accepts."""

from __future__ import annotations

import copy
import importlib
import json
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import pytest

from canvas_events.settings import DEV_JWT_SECRET
from tests.deploy.project import (
    APP_SERVICES,
    COMPOSE_FILE,
    DOCKERFILE,
    DOCUMENTED_ENV,
    IMAGES,
    ROOT,
    STAND_IN_IMAGE,
    AppService,
    console_scripts,
    dockerfile_build,
    interpolate,
    load_compose,
)

INFRASTRUCTURE = ("rabbitmq", "postgres")
STAND_IN = "fake-openai"
OFFLINE_COMMAND = (
    "OPENAI_BASE_URL=http://fake-openai:8090/v1 OPENAI_API_KEY=fake "
    "docker compose --profile fake-llm up --build"
)

by_name = pytest.mark.parametrize("app", APP_SERVICES, ids=lambda app: app.name)


def schema_errors(document: dict[str, Any]) -> list[str]:
    # Imported here: without the packages only the schema tests fail, not the collection.
    from jsonschema import Draft202012Validator

    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    Draft202012Validator.check_schema(schema)
    errors = Draft202012Validator(schema).iter_errors(document)
    return sorted(f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in errors)


def service(name: str) -> dict[str, Any]:
    services = load_compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    entry = services[name]
    assert isinstance(entry, dict)
    return entry


# The one variable compose requires of the host.
HOST = {"JWT_SECRET": "a-secret-the-host-sets-0123456789abcdef"}


def environment(name: str, host: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment as its process sees it with only JWT_SECRET set on the
    host (or ``host``)."""
    env = service(name).get("environment", {})
    assert isinstance(env, dict), f"{name}: write environment as a mapping"
    return {
        key: interpolate(str(value), HOST if host is None else host) for key, value in env.items()
    }


def healthcheck_command(name: str) -> list[str]:
    test = service(name)["healthcheck"]["test"]
    assert isinstance(test, list)
    return [str(part) for part in test]


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    assert schema_errors(load_compose()) == []


def test_schema_check_catches_a_misspelt_service_key() -> None:
    document = copy.deepcopy(load_compose())
    document["services"]["gateway"]["healthchek"] = document["services"]["gateway"].pop(
        "healthcheck"
    )

    assert any("healthchek" in error for error in schema_errors(document))


def test_compose_file_has_no_obsolete_version_key() -> None:
    assert "version" not in load_compose()


@pytest.mark.parametrize("name", [app.name for app in APP_SERVICES] + [*INFRASTRUCTURE, STAND_IN])
def test_every_container_has_a_healthcheck_and_restarts_unless_stopped(name: str) -> None:
    entry = service(name)

    assert entry["restart"] == "unless-stopped"
    assert healthcheck_command(name)[0] in ("CMD", "CMD-SHELL")
    assert not entry["healthcheck"].get("disable", False)


def test_only_the_stand_in_model_waits_for_a_profile() -> None:
    profiled = {name for name, entry in load_compose()["services"].items() if "profiles" in entry}

    assert profiled == {STAND_IN}


@by_name
def test_service_builds_its_image_of_the_dockerfile_from_the_repository_root(
    app: AppService,
) -> None:
    build = service(app.name)["build"]

    assert build["context"] == "."
    assert (ROOT / build["dockerfile"]) == app.dockerfile == DOCKERFILE
    assert build["args"] == app.image.build_args
    assert app.dockerfile.is_file()


def test_every_build_in_compose_names_an_image_of_the_dockerfile() -> None:
    folders = {image.folder for image in IMAGES}

    for name, entry in load_compose()["services"].items():
        if "build" in entry:
            assert (ROOT / entry["build"]["dockerfile"]) == DOCKERFILE, name
            assert entry["build"]["args"]["SERVICE"] in folders, name


@by_name
def test_service_publishes_its_port(app: AppService) -> None:
    if app.name == "job-orchestrator":
        # Its internal API is for the other containers only: not on the host.
        assert "ports" not in service(app.name)
        assert str(app.port) in service(app.name)["expose"]
    else:
        assert f"{app.port}:{app.port}" in service(app.name)["ports"]


@pytest.mark.parametrize("name", [app.name for app in APP_SERVICES if "JWT_SECRET" in app.env])
def test_compose_refuses_to_start_without_jwt_secret(name: str) -> None:
    with pytest.raises(AssertionError, match="JWT_SECRET is required"):
        environment(name, host={})


@by_name
def test_service_healthcheck_asks_ready_on_its_own_port(app: AppService) -> None:
    command = healthcheck_command(app.name)

    # python's urllib: the slim image has no curl, and urlopen raises on a 503.
    assert command[:3] == ["CMD", "python", "-c"]
    assert f"urlopen('http://127.0.0.1:{app.port}/ready'" in command[3]


@by_name
def test_service_starts_after_healthy_infrastructure(app: AppService) -> None:
    depends_on = service(app.name)["depends_on"]
    needed = {"rabbitmq"} | ({"postgres"} if "DATABASE_URL" in app.env else set())

    assert needed <= set(depends_on)
    assert {dependency["condition"] for dependency in depends_on.values()} == {"service_healthy"}


@pytest.mark.parametrize("name", ["gateway", "notifier"])
def test_readers_of_the_orchestrators_tables_start_after_it_is_healthy(name: str) -> None:
    dependency = service(name)["depends_on"]["job-orchestrator"]

    assert dependency["condition"] == "service_healthy"


@by_name
def test_service_gets_every_setting_it_reads(app: AppService) -> None:
    env = environment(app.name)

    assert app.env <= set(env), f"missing: {sorted(app.env - set(env))}"
    assert env[app.port_var] == str(app.port)


def test_services_cover_every_setting_of_architecture_section_2() -> None:
    assert set().union(*(app.env for app in APP_SERVICES)) == DOCUMENTED_ENV


@by_name
def test_service_settings_accept_the_compose_defaults(
    app: AppService, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in DOCUMENTED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment(app.name).items():
        monkeypatch.setenv(name, value)

    settings = importlib.import_module(f"{app.package}.settings").Settings()

    assert getattr(settings, app.port_var.lower()) == app.port
    if "JWT_SECRET" in app.env:
        assert settings.secret == HOST["JWT_SECRET"]
        assert settings.secret != DEV_JWT_SECRET


def test_compose_defaults_leave_the_generator_without_key_or_base_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = environment("ai-generator")
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    settings = importlib.import_module("canvas_generator.settings").Settings()

    # Compose passes `OPENAI_API_KEY=` when the host has none: that must mean "no key"
    # (a clear permanent error per job), never an empty key or base URL.
    assert (env["OPENAI_API_KEY"], env["OPENAI_BASE_URL"]) == ("", "")
    assert settings.openai_api_key is None
    assert settings.openai_base_url is None


@pytest.mark.parametrize("name", [app.name for app in APP_SERVICES if "DATABASE_URL" in app.env])
def test_database_url_reaches_the_compose_postgres_with_its_password(name: str) -> None:
    postgres = environment("postgres")
    url = urlsplit(environment(name)["DATABASE_URL"])

    assert url.scheme == "postgresql"
    assert (url.hostname, url.port, url.path) == ("postgres", 5432, "/canvas_jobs")
    assert (url.username, url.password) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
    )
    assert postgres["POSTGRES_DB"] == "canvas_jobs"


@by_name
def test_amqp_url_reaches_the_compose_rabbitmq_with_its_user(app: AppService) -> None:
    rabbitmq = environment("rabbitmq")
    url = urlsplit(environment(app.name)["AMQP_URL"])

    assert url.scheme == "amqp"
    assert (url.hostname, url.port) == ("rabbitmq", 5672)
    assert (url.username, url.password) == (
        rabbitmq["RABBITMQ_DEFAULT_USER"],
        rabbitmq["RABBITMQ_DEFAULT_PASS"],
    )


def test_rabbitmq_runs_a_supported_release_with_management_ui_a_volume_and_a_ping_healthcheck() -> (
    None
):
    rabbitmq = service("rabbitmq")
    container_ports = {port.rsplit(":", 1)[-1] for port in rabbitmq["ports"]}

    # 3.13: supported (3.10 is past its end of life), and what the code is tested against
    # accepts it (quorum queues with at-least-once dead-lettering, classic ones with
    # x-max-priority, per-process transient queues).
    assert rabbitmq["image"] == "rabbitmq:3.13-management"
    assert container_ports == {"5672", "15672"}
    assert healthcheck_command("rabbitmq") == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert_named_volume_at(rabbitmq, "/var/lib/rabbitmq")


def test_postgres_runs_15_with_the_database_a_volume_and_pg_isready() -> None:
    postgres = service("postgres")

    assert postgres["image"] == "postgres:15"
    assert environment("postgres")["POSTGRES_DB"] == "canvas_jobs"
    assert "pg_isready" in healthcheck_command("postgres")
    assert_named_volume_at(postgres, "/var/lib/postgresql/data")


def assert_named_volume_at(entry: dict[str, Any], target: str) -> None:
    sources = {}
    for volume in entry["volumes"]:
        source, _, mounted_at = volume.partition(":")
        sources[mounted_at] = source
    assert target in sources
    assert sources[target] in load_compose()["volumes"]


def test_stand_in_model_runs_its_own_image_under_its_profile() -> None:
    stand_in = service(STAND_IN)
    env = environment(STAND_IN)
    build = stand_in["build"]
    image = dockerfile_build(ROOT / build["dockerfile"], build["args"]).instructions
    command = [instruction for instruction in image if instruction.keyword == "CMD"][-1]

    assert stand_in["profiles"] == ["fake-llm"]
    assert build["context"] == "."
    assert build["args"] == STAND_IN_IMAGE.build_args
    # Its image runs the stand-in itself.
    assert "command" not in stand_in
    assert command.exec_form() == [STAND_IN_IMAGE.script]
    assert (env["FAKE_OPENAI_HOST"], env["FAKE_OPENAI_PORT"]) == ("0.0.0.0", "8090")
    assert "urlopen('http://127.0.0.1:8090/health'" in healthcheck_command(STAND_IN)[-1]
    assert f"{STAND_IN_IMAGE.port}:{STAND_IN_IMAGE.port}" in stand_in["ports"]


def test_compose_file_says_how_to_run_offline() -> None:
    assert OFFLINE_COMMAND in COMPOSE_FILE.read_text()


def test_every_command_in_compose_is_a_declared_console_script() -> None:
    declared = set().union(*(console_scripts(image.pyproject) for image in IMAGES))

    for name, entry in load_compose()["services"].items():
        if "build" in entry and "command" in entry:
            assert entry["command"][0] in declared, name
