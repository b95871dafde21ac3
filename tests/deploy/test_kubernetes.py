"""deploy/kubernetes, checked offline: the kustomization is built here with PyYAML (no
binary needed; one test proves ``kubectl kustomize`` builds the same), every core
manifest is validated against the Kubernetes JSON schemas that kubernetes-validate
ships (strict: an unknown or misspelt field fails), the KEDA objects (no schema ships
for CRDs) structurally, and each Deployment for what running canvas-jobs needs:
probes on the right paths and ports, resources, a non-root read-only container,
graceful termination longer than the drain, a PodDisruptionBudget, its settings from
the ConfigMap and only its own secrets from the Secret."""

from __future__ import annotations

import copy
import functools
import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from canvas_events.topology import Topology
from tests.deploy.project import (
    APP_SERVICES,
    DOCUMENTED_ENV,
    ROOT,
    AppService,
    console_scripts,
    dockerfile_build,
    load_compose,
)
from tests.deploy.test_prometheus_rules import exported

KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
SECRET_EXAMPLE = KUSTOMIZE_DIR / "secret.example.yaml"
RABBITMQ_CLUSTER = KUSTOMIZE_DIR / "rabbitmq-cluster.yaml"
# The RabbitmqCluster's spec fields (rabbitmq.com/v1beta1, the Cluster Operator's CRD).
RABBITMQ_CLUSTER_SPEC = frozenset(
    {
        "replicas", "image", "imagePullSecrets", "service", "persistence", "resources",
        "affinity", "tolerations", "rabbitmq", "tls", "override", "skipPostDeploySteps",
        "terminationGracePeriodSeconds", "delayStartSeconds", "secretBackend",
        "autoEnableAllFeatureFlags",
    }
)  # fmt: skip
NAMESPACE = "canvas-jobs"
CONFIG_MAP = "canvas-jobs-config"
SECRET = "canvas-jobs-secrets"
SECRET_KEYS = frozenset({"JWT_SECRET", "OPENAI_API_KEY", "DATABASE_URL", "AMQP_URL"})
# Read by KEDA only, never by a service.
KEDA_SECRET_KEYS = frozenset({"RABBITMQ_MANAGEMENT_URL"})
# Beyond docs/settings.md's table: the topology prefix, the drain, where the orchestrator is,
# where browsers find the notifier (behind the Ingress).
EXTRA_CONFIG = frozenset(
    {"AMQP_TOPOLOGY_PREFIX", "SHUTDOWN_GRACE_SECONDS", "ORCHESTRATOR_URL", "NOTIFIER_PUBLIC_URL"}
)
# Oldest Kubernetes we claim (deploy/README.md) and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Services whose Service sends them requests: they wait for endpoints to go (preStop).
ROUTED = frozenset({"gateway", "notifier", "job-orchestrator"})
KEDA_API = "keda.sh/v1alpha1"
# What the loader below does of kustomize; anything else must be taught to it first.
SUPPORTED_KUSTOMIZATION = frozenset(
    {"apiVersion", "kind", "namespace", "resources", "configMapGenerator"}
)

by_name = pytest.mark.parametrize("app", APP_SERVICES, ids=lambda app: app.name)


# -- building the kustomization -------------------------------------------------------


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((KUSTOMIZE_DIR / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def read_env_file(path: Path) -> dict[str, str]:
    """A kustomize ``envs`` file: KEY=VALUE lines, # comments, blank lines."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, found, value = line.partition("=")
        assert found, f"{path.name}: not KEY=VALUE: {line!r}"
        values[key] = value
    return values


@functools.cache
def _build() -> tuple[dict[str, Any], ...]:
    spec = kustomization()
    unsupported = set(spec) - SUPPORTED_KUSTOMIZATION
    assert not unsupported, f"teach build() in this test about {sorted(unsupported)}"
    namespace = spec["namespace"]
    documents: list[dict[str, Any]] = []
    for resource in spec["resources"]:
        for document in yaml.safe_load_all((KUSTOMIZE_DIR / resource).read_text()):
            if document:
                documents.append(document)
    for generator in spec.get("configMapGenerator", []):
        assert set(generator) <= {"name", "envs", "options"}, generator
        data: dict[str, str] = {}
        for env_file in generator["envs"]:
            data.update(read_env_file(KUSTOMIZE_DIR / env_file))
        metadata: dict[str, Any] = {"name": generator["name"]}
        labels = generator.get("options", {}).get("labels")
        if labels:
            metadata["labels"] = labels
        documents.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        )
    for document in documents:
        if document["kind"] != "Namespace":  # every other kind here is namespaced
            document["metadata"]["namespace"] = namespace
    return tuple(documents)


def build() -> list[dict[str, Any]]:
    """What ``kubectl kustomize deploy/kubernetes`` outputs, ConfigMap names without
    kustomize's content hash (references keep the plain name)."""
    return copy.deepcopy(list(_build()))


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _build() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _build() if d["kind"] == kind]


def config() -> dict[str, str]:
    data = resource("ConfigMap", CONFIG_MAP)["data"]
    assert isinstance(data, dict)
    return data


def secret_example() -> dict[str, Any]:
    document = yaml.safe_load(SECRET_EXAMPLE.read_text())
    assert isinstance(document, dict)
    return document


def deployment(app: AppService) -> dict[str, Any]:
    return resource("Deployment", app.name)


def pod(app: AppService) -> dict[str, Any]:
    spec = deployment(app)["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container(app: AppService) -> dict[str, Any]:
    [only] = pod(app)["containers"]
    assert isinstance(only, dict)
    return only


def pod_labels(app: AppService) -> dict[str, str]:
    labels = deployment(app)["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def container_port(app: AppService, port: int | str) -> int:
    """The container port a probe or a targetPort names (by name or number)."""
    for entry in container(app)["ports"]:
        if port in (entry["containerPort"], entry.get("name")):
            return int(entry["containerPort"])
    raise AssertionError(f"{app.name}: no container port {port!r}")


def environment(app: AppService) -> dict[str, str]:
    """The variables the container starts with: the ConfigMap, then ``env`` over it
    (Kubernetes' precedence), secrets as the example's placeholders."""
    env: dict[str, str] = {}
    for source in container(app).get("envFrom", []):
        assert source["configMapRef"]["name"] == CONFIG_MAP
        env.update(config())
    placeholders = secret_example()["stringData"]
    for variable in container(app).get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = placeholders[ref["key"]]
    return env


def secret_refs(app: AppService) -> dict[str, tuple[str, str]]:
    """{variable: (secret, key)} of the container's secretKeyRefs."""
    refs = {}
    for variable in container(app).get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs[variable["name"]] = (ref["name"], ref["key"])
    return refs


def pre_stop_sleep(app: AppService) -> int:
    """Seconds of the preStop ``sleep``, 0 without one."""
    hook = container(app).get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return int(command[1])


_QUANTITY = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>m|Ki|Mi|Gi|k|M|G)?")
_UNITS = {None: 1, "m": 0.001, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (the forms used here) as a number."""
    match = _QUANTITY.fullmatch(str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match["number"]) * _UNITS[match["unit"]]


def schema_errors(document: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    return []


def core(document: dict[str, Any]) -> bool:
    """Kinds of Kubernetes itself (schemas ship for them); KEDA's are CRDs."""
    return not str(document["apiVersion"]).startswith("keda.sh/")


# -- the build ------------------------------------------------------------------------


def test_kubectl_kustomize_builds_exactly_what_the_test_loader_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not on PATH: it is part of the machine image (kubectl kustomize "
            "checks that deploy/kubernetes builds); install it, or run the other tests "
            "of this module, which need no binary"
        )
    built = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE_DIR)], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr
    # The generated ConfigMap's name carries a content hash, in every reference too.
    hashed = re.search(rf"\b{CONFIG_MAP}-[a-z0-9]{{10}}\b", built.stdout)
    assert hashed, "the ConfigMap has no content hash: config changes would not roll pods"
    text = built.stdout.replace(hashed[0], CONFIG_MAP)
    from_kubectl = [document for document in yaml.safe_load_all(text) if document]

    def key(document: dict[str, Any]) -> tuple[str, str]:
        return document["kind"], document["metadata"]["name"]

    assert sorted(from_kubectl, key=key) == sorted(build(), key=key)


def test_build_has_a_deployment_service_and_budget_per_service_and_nothing_stateful() -> None:
    names = {app.name for app in APP_SERVICES}

    assert {d["metadata"]["name"] for d in of_kind("Deployment")} == names
    assert {d["metadata"]["name"] for d in of_kind("PodDisruptionBudget")} == names
    assert names <= {d["metadata"]["name"] for d in of_kind("Service")}
    # PostgreSQL and RabbitMQ come from an operator or a managed service.
    assert of_kind("StatefulSet") == []
    # The real Secret is created apart (deploy/README.md), never built from the repo.
    assert of_kind("Secret") == []


def test_every_object_lives_in_the_canvas_jobs_namespace() -> None:
    assert resource("Namespace", NAMESPACE)
    for document in build():
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == NAMESPACE, document["metadata"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_core_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    errors = {
        f"{document['kind']}/{document['metadata']['name']}": schema_errors(document, version)
        for document in [*build(), secret_example()]
        if core(document)
    }

    assert {name: found for name, found in errors.items() if found} == {}


def test_schema_check_catches_a_misspelt_field() -> None:
    document = copy.deepcopy(resource("Deployment", "gateway"))
    probed = document["spec"]["template"]["spec"]["containers"][0]
    probed["readinesProbe"] = probed.pop("readinessProbe")

    assert any("readinesProbe" in error for error in schema_errors(document, "1.29.0"))


# -- configuration and secrets --------------------------------------------------------


def test_config_map_holds_every_non_secret_setting_and_no_secret() -> None:
    keys = set(config())

    assert keys == (DOCUMENTED_ENV - SECRET_KEYS) | EXTRA_CONFIG
    assert not keys & SECRET_KEYS


def test_generator_finds_the_orchestrator_through_its_service() -> None:
    url = urlsplit(config()["ORCHESTRATOR_URL"])
    service = resource("Service", "job-orchestrator")

    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"] == int(config()["ORCHESTRATOR_PORT"])


def test_example_secret_has_exactly_the_secret_keys_and_only_placeholders() -> None:
    example = secret_example()
    values = example["stringData"]

    assert example["metadata"] == {
        "name": SECRET,
        "namespace": NAMESPACE,
        "labels": {"app.kubernetes.io/part-of": "canvas-jobs"},
    }
    assert set(values) == SECRET_KEYS | KEDA_SECRET_KEYS
    assert all("REPLACE" in value for value in values.values())


def test_real_secret_files_are_ignored_by_git() -> None:
    # Read, not asked of git: the tests also run from an export without .git.
    lines = (KUSTOMIZE_DIR / ".gitignore").read_text().splitlines()
    patterns = {line.strip() for line in lines if line.strip() and not line.startswith("#")}

    assert {"secret.yaml", "secrets.env"} <= patterns


def test_database_and_broker_are_external_services_the_urls_reach() -> None:
    postgres = resource("Service", "postgres")
    rabbitmq = resource("Service", "rabbitmq")
    placeholders = secret_example()["stringData"]

    assert postgres["spec"]["type"] == rabbitmq["spec"]["type"] == "ExternalName"
    assert urlsplit(placeholders["DATABASE_URL"]).hostname == "postgres"
    # Fully qualified, because KEDA resolves it from its own namespace.
    assert urlsplit(placeholders["AMQP_URL"]).hostname == f"rabbitmq.{NAMESPACE}.svc"


# -- each Deployment ------------------------------------------------------------------


@by_name
def test_deployment_runs_a_console_script_of_its_service(app: AppService) -> None:
    command = container(app)["command"]

    assert command[0] == app.script
    assert command[0] in console_scripts(app.pyproject)
    assert container(app)["image"].split(":")[0] == f"canvas-jobs/{app.name}"


@by_name
def test_deployment_listens_on_its_port_from_the_config_map(app: AppService) -> None:
    assert config()[app.port_var] == str(app.port)
    assert [entry["containerPort"] for entry in container(app)["ports"]] == [app.port]


@by_name
def test_deployment_probes_ready_and_health_on_its_port(app: AppService) -> None:
    probes = {
        kind: container(app)[kind]["httpGet"]
        for kind in ("readinessProbe", "livenessProbe", "startupProbe")
    }

    assert probes["readinessProbe"]["path"] == "/ready"
    # Alive, not ready: a pod waiting for its database must not be restarted for it.
    assert probes["livenessProbe"]["path"] == "/health"
    assert probes["startupProbe"]["path"] == "/health"
    for probe in probes.values():
        assert container_port(app, probe["port"]) == app.port


@by_name
def test_deployment_requests_and_limits_cpu_and_memory(app: AppService) -> None:
    resources = container(app)["resources"]

    for name in ("cpu", "memory"):
        request = quantity(resources["requests"][name])
        limit = quantity(resources["limits"][name])
        assert 0 < request <= limit, (name, request, limit)
    # Above what the process holds at rest (50-85 MiB measured, deploy/README.md).
    assert quantity(resources["requests"]["memory"]) >= 128 * 2**20


def test_generator_is_sized_for_io_and_the_notifier_for_connections() -> None:
    by_service = {app.name: container(app)["resources"] for app in APP_SERVICES}

    assert quantity(by_service["ai-generator"]["requests"]["cpu"]) == min(
        quantity(resources["requests"]["cpu"]) for resources in by_service.values()
    )
    assert quantity(by_service["notifier"]["limits"]["memory"]) == max(
        quantity(resources["limits"]["memory"]) for resources in by_service.values()
    )


@by_name
def test_deployment_runs_as_the_images_user_without_privilege(app: AppService) -> None:
    user = next(
        instruction.arguments
        for instruction in reversed(
            dockerfile_build(app.dockerfile, app.image.build_args).instructions
        )
        if instruction.keyword == "USER"
    )
    security = pod(app)["securityContext"]
    hardened = container(app)["securityContext"]

    assert f"{security['runAsUser']}:{security['runAsGroup']}" == user
    assert security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert hardened["runAsNonRoot"] is True
    assert hardened["allowPrivilegeEscalation"] is False
    assert hardened["readOnlyRootFilesystem"] is True
    assert hardened["capabilities"] == {"drop": ["ALL"]}
    assert not hardened.get("privileged", False)
    assert pod(app)["automountServiceAccountToken"] is False


@by_name
def test_deployment_has_no_service_link_variables(app: AppService) -> None:
    # Kubernetes would set GATEWAY_PORT=tcp://10.0.0.1:8000 (a docker-link variable of the
    # Service `gateway`) in every pod: the name of a setting. The ConfigMap's value wins
    # today; without it, the service would refuse that value and not start.
    assert pod(app)["enableServiceLinks"] is False


@by_name
def test_deployment_terminates_after_its_drain(app: AppService) -> None:
    grace = float(environment(app)["SHUTDOWN_GRACE_SECONDS"])

    # The preStop sleep counts against the same grace period.
    assert pod(app)["terminationGracePeriodSeconds"] > pre_stop_sleep(app) + grace


@by_name
def test_deployment_waits_for_endpoints_to_go_only_where_a_service_routes_to_it(
    app: AppService,
) -> None:
    assert (pre_stop_sleep(app) > 0) == (app.name in ROUTED)


def test_generator_drains_longer_than_one_model_call() -> None:
    generator = next(app for app in APP_SERVICES if app.name == "ai-generator")
    env = environment(generator)

    assert float(env["SHUTDOWN_GRACE_SECONDS"]) > float(env["OPENAI_TIMEOUT_SECONDS"])


@by_name
def test_deployment_takes_settings_from_the_config_map_and_only_its_own_secrets(
    app: AppService,
) -> None:
    sources = container(app)["envFrom"]
    refs = secret_refs(app)

    assert sources == [{"configMapRef": {"name": CONFIG_MAP}}]
    assert refs == {key: (SECRET, key) for key in app.env & SECRET_KEYS}
    assert app.env <= set(environment(app)), sorted(app.env - set(environment(app)))


@by_name
def test_service_settings_accept_the_deployment_environment(
    app: AppService, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in DOCUMENTED_ENV | EXTRA_CONFIG:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment(app).items():
        monkeypatch.setenv(name, value)

    settings = importlib.import_module(f"{app.package}.settings").Settings()

    assert getattr(settings, app.port_var.lower()) == app.port
    assert settings.amqp_topology_prefix == config()["AMQP_TOPOLOGY_PREFIX"]


@by_name
def test_deployment_is_scraped_by_prometheus_on_its_port(app: AppService) -> None:
    annotations = deployment(app)["spec"]["template"]["metadata"]["annotations"]

    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(app.port)
    assert annotations["prometheus.io/path"] == "/metrics"


@by_name
def test_deployment_selector_matches_its_pods(app: AppService) -> None:
    selector = deployment(app)["spec"]["selector"]["matchLabels"]

    assert selector.items() <= pod_labels(app).items()


@by_name
def test_service_routes_its_port_to_the_pods(app: AppService) -> None:
    service = resource("Service", app.name)["spec"]
    [port] = service["ports"]

    assert service["selector"].items() <= pod_labels(app).items()
    assert port["port"] == app.port
    assert container_port(app, port["targetPort"]) == app.port
    assert service.get("type", "ClusterIP") == "ClusterIP"


def test_notifier_needs_no_sticky_sessions() -> None:
    # Clients resume on any pod with ?after=<position> (deploy/README.md).
    assert resource("Service", "notifier")["spec"].get("sessionAffinity", "None") == "None"


@by_name
def test_disruption_budget_covers_the_pods_and_never_blocks_a_drain(app: AppService) -> None:
    budget = resource("PodDisruptionBudget", app.name)["spec"]

    assert budget["selector"]["matchLabels"].items() <= pod_labels(app).items()
    # maxUnavailable: a single replica can still move; minAvailable 1 would pin it.
    assert budget["maxUnavailable"] == 1
    assert "minAvailable" not in budget
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


# -- KEDA -----------------------------------------------------------------------------


def scaled_object() -> dict[str, Any]:
    return resource("ScaledObject", "ai-generator")


def test_generator_replicas_belong_to_the_autoscaler() -> None:
    # A replicas field would be reset by every `kubectl apply`, fighting KEDA.
    assert "replicas" not in resource("Deployment", "ai-generator")["spec"]


def test_scaled_object_scales_the_generator_deployment_between_bounds() -> None:
    spec = scaled_object()["spec"]

    assert scaled_object()["apiVersion"] == KEDA_API
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": resource("Deployment", "ai-generator")["metadata"]["name"],
    }
    # Never zero: the gateway's health is degraded with no generator on the work queue.
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]


def _trigger(kind: str) -> dict[str, Any]:
    [trigger] = [t for t in scaled_object()["spec"]["triggers"] if t["type"] == kind]
    return dict(trigger)


def test_scaled_object_follows_the_depth_of_the_work_queue() -> None:
    trigger = _trigger("rabbitmq")
    metadata = trigger["metadata"]

    assert trigger["type"] == "rabbitmq"
    assert metadata["mode"] == "QueueLength"
    # Over the management API: ready plus unacked, so running attempts count.
    assert metadata["protocol"] == "http"
    assert metadata["queueName"] == Topology().generator_work.name
    assert metadata["queueName"] == Topology(config()["AMQP_TOPOLOGY_PREFIX"]).generator_work.name
    # One pod takes MAX_CONCURRENT_JOBS at once: that many waiting is one more pod's work.
    assert metadata["value"] == config()["MAX_CONCURRENT_JOBS"]
    # The broker's password never sits in the trigger itself.
    assert not {"host", "hostFromEnv"} & set(metadata)


def test_scaled_object_follows_the_jobs_waiting_for_dispatch() -> None:
    # With fair dispatch the backlog waits in the orchestrator, out of the queue's sight.
    triggers = scaled_object()["spec"]["triggers"]
    assert sorted(t["type"] for t in triggers) == ["prometheus", "rabbitmq"]
    metadata = _trigger("prometheus")["metadata"]
    assert metadata["serverAddress"].startswith("http")
    names = set(re.findall(r"\b(canvas_[a-z_]+)\b", metadata["query"]))
    assert names == {"canvas_dispatch_waiting_jobs", "canvas_attempts_in_flight"}
    assert names <= exported()
    # Fleet-wide gauges every orchestrator reports alike: summed, they would double.
    assert "sum(" not in metadata["query"]
    assert metadata["threshold"] == config()["MAX_CONCURRENT_JOBS"]


def test_trigger_authentication_reads_the_amqp_url_from_the_secret() -> None:
    trigger = _trigger("rabbitmq")
    authentication = resource("TriggerAuthentication", trigger["authenticationRef"]["name"])

    assert authentication["apiVersion"] == KEDA_API
    assert authentication["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": SECRET, "key": "RABBITMQ_MANAGEMENT_URL"}
    ]
    assert set(authentication["spec"]) == {"secretTargetRef"}
    # The management API of the same broker, from KEDA's namespace.
    placeholders = secret_example()["stringData"]
    api = urlsplit(placeholders["RABBITMQ_MANAGEMENT_URL"])
    broker = urlsplit(placeholders["AMQP_URL"])
    assert (api.scheme, api.hostname, api.port) == ("http", broker.hostname, 15672)
    assert str(api.hostname).endswith(f".{NAMESPACE}.svc")


def test_only_the_systems_own_pods_and_prometheus_reach_the_orchestrators_port() -> None:
    orchestrator = next(app for app in APP_SERVICES if app.name == "job-orchestrator")
    policy = resource("NetworkPolicy", "job-orchestrator")["spec"]

    selected = policy["podSelector"]["matchLabels"]
    assert selected.items() <= pod_labels(orchestrator).items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "canvas-jobs"}}},
        {"namespaceSelector": {"matchLabels": {"canvas-jobs/scrape": "true"}}},
    ]
    assert [container_port(orchestrator, port["port"]) for port in rule["ports"]] == [8002]
    # Every pod of the system carries the label the policy lets in (the generators ask
    # the orchestrator before each model call).
    for app in APP_SERVICES:
        assert pod_labels(app)["app.kubernetes.io/part-of"] == "canvas-jobs"


# -- reaching it: the Ingress, and Prometheus -------------------------------------------


def _backends(ingress: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """{path: (path type, Service name, port name)} of the Ingress's one host."""
    [rule] = ingress["spec"]["rules"]
    return {
        path["path"]: (
            path["pathType"],
            path["backend"]["service"]["name"],
            path["backend"]["service"]["port"]["name"],
        )
        for path in rule["http"]["paths"]
    }


def _service_port_names(name: str) -> set[str]:
    return {port["name"] for port in resource("Service", name)["spec"]["ports"]}


def test_ingress_serves_page_and_api_from_the_gateway_and_the_websocket_from_the_notifier() -> None:
    ingress = resource("Ingress", "canvas-jobs")
    backends = _backends(ingress)

    assert backends == {
        "/ws": ("Exact", "notifier", "http"),
        "/api": ("Prefix", "gateway", "http"),
        "/": ("Prefix", "gateway", "http"),
    }
    for _, service, port in backends.values():
        assert port in _service_port_names(service)
    # The notifier's WebSocket is served at /ws, the one path the Ingress sends it.
    notifier = next(app for app in APP_SERVICES if app.name == "notifier")
    assert container_port(notifier, "http") == notifier.port
    # TLS for the host the rules serve: browsers get wss:// and https://.
    [rule] = ingress["spec"]["rules"]
    [tls] = ingress["spec"]["tls"]
    assert tls["hosts"] == [rule["host"]]


def test_the_page_behind_the_ingress_sends_browsers_to_its_websocket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = next(app for app in APP_SERVICES if app.name == "gateway")
    for name in DOCUMENTED_ENV | EXTRA_CONFIG:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment(gateway).items():
        monkeypatch.setenv(name, value)
    settings = importlib.import_module("canvas_gateway.settings").Settings()
    page = importlib.import_module("canvas_gateway.routes.page")
    [rule] = resource("Ingress", "canvas-jobs")["spec"]["rules"]

    # What /config.json hands the page, whatever host the request came by.
    url = urlsplit(page.notifier_url(settings, None))

    assert (url.scheme, url.hostname, url.port, url.path) == ("wss", rule["host"], None, "/ws")
    assert _backends(resource("Ingress", "canvas-jobs"))[url.path][1] == "notifier"


def test_service_monitor_scrapes_every_service_on_its_metrics_path() -> None:
    [monitor] = [
        d for d in yaml.safe_load_all((KUSTOMIZE_DIR / "service-monitor.yaml").read_text()) if d
    ]
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports = {endpoint["port"]: endpoint["path"] for endpoint in monitor["spec"]["endpoints"]}

    assert monitor["metadata"]["namespace"] == NAMESPACE
    for app in APP_SERVICES:
        service = resource("Service", app.name)
        assert selector.items() <= service["metadata"]["labels"].items(), app.name
        scraped = _service_port_names(app.name) & set(ports)
        assert len(scraped) == 1, (app.name, scraped)
        # The path the Deployment tells Prometheus' annotations too.
        annotations = deployment(app)["spec"]["template"]["metadata"]["annotations"]
        assert ports[scraped.pop()] == annotations["prometheus.io/path"] == "/metrics"


# -- the broker -----------------------------------------------------------------------


def test_rabbitmq_cluster_is_three_nodes_apart_behind_the_broker_service() -> None:
    [cluster] = [d for d in yaml.safe_load_all(RABBITMQ_CLUSTER.read_text()) if d]
    spec = cluster["spec"]
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]

    assert (cluster["apiVersion"], cluster["kind"]) == ("rabbitmq.com/v1beta1", "RabbitmqCluster")
    assert set(spec) <= RABBITMQ_CLUSTER_SPEC
    # Quorum queues (AMQP_QUEUE_TYPE) go on with one node of three away.
    assert spec["replicas"] == 3
    assert config()["AMQP_QUEUE_TYPE"] == "quorum"
    # The ExternalName the services' AMQP_URL reaches is the operator's Service for it.
    assert resource("Service", "rabbitmq")["spec"]["externalName"] == (
        f"{name}.{namespace}.svc.cluster.local"
    )
    # The release the tests run against (compose), not the operator's default.
    assert spec["image"] == load_compose()["services"]["rabbitmq"]["image"]
    # One node per Kubernetes node: the operator labels its pods with the cluster's name.
    [term] = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/name", "operator": "In", "values": [name]}
    ]
    assert "cluster_partition_handling = pause_minority" in spec["rabbitmq"]["additionalConfig"]
    # Applied apart, after the operator (its kind exists only with it).
    assert not of_kind("RabbitmqCluster")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rabbitmq_cluster_core_parts_are_valid_against_the_kubernetes_schemas(
    version: str,
) -> None:
    # The operator copies affinity and resources into its StatefulSet's pods as they are.
    [cluster] = [d for d in yaml.safe_load_all(RABBITMQ_CLUSTER.read_text()) if d]
    spec = cluster["spec"]
    pod_ = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "rabbitmq"},
        "spec": {
            "containers": [
                {"name": "rabbitmq", "image": spec["image"], "resources": spec["resources"]}
            ],
            "affinity": spec["affinity"],
        },
    }

    assert schema_errors(pod_, version) == []
