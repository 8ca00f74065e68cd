"""The Kubernetes manifests of infra/k8s render, and agree with the contract and with each other.

Both the base and the local overlay are rendered with the real kustomize, the version pinned in
``infra/k8s/render.sh`` (``make test`` installs it first, ``infra/tools.sh``); without it these
tests fail rather than skip. Then the objects are checked: names, ports 50051/9464/9465, gRPC
probes on recstack.v1.RankingService, RECSTACK_* variables that are real flags, references to
ConfigMaps, Secrets and volumes that resolve, no more stream consumers than user-events has
partitions, and every Redis setting of an overlay naming the same Redis the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
RENDER_SH = K8S / "render.sh"
OVERLAYS = ("base", "overlays/local")
NAMESPACE = "recstack"
SERVICE_NAME = "recstack.v1.RankingService"
INSTALL_TIMEOUT_S = 900  # `go install` of kustomize on a fresh two-core machine, with room

# Variables the manifests set for `recstack stream` that need flags the consumer does not have
# yet (Kafka SASL/SCRAM for the Strimzi listener): see test_kafka_sasl_variables_are_flags.
PENDING_STREAM_FLAGS = {
    "RECSTACK_KAFKA_SECURITY_PROTOCOL",
    "RECSTACK_KAFKA_SASL_MECHANISM",
    "RECSTACK_KAFKA_SASL_USERNAME",
    "RECSTACK_KAFKA_SASL_PASSWORD",
}


def _pinned_kustomize_version() -> str:
    match = re.search(r"^KUSTOMIZE_VERSION=(v[0-9.]+)$", RENDER_SH.read_text(), re.MULTILINE)
    assert match, "infra/k8s/render.sh pins no KUSTOMIZE_VERSION"
    return match.group(1)


@pytest.fixture(scope="module")
def kustomize() -> str:
    """The pinned kustomize binary (``render.sh --kustomize`` finds it, or installs it with Go)."""
    result = subprocess.run(
        [str(RENDER_SH), "--kustomize"], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )
    path = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and os.access(path, os.X_OK), (
        f"no kustomize (make test installs it with infra/tools.sh):\n{result.stderr}"
    )
    return path


def _key(resource: dict) -> tuple[str, str, str, str]:
    meta = resource["metadata"]
    return (resource["apiVersion"], resource["kind"], meta.get("namespace", ""), meta["name"])


@pytest.fixture(scope="module")
def rendered(kustomize: str) -> dict[str, list[dict]]:
    out = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            [kustomize, "build", str(K8S / overlay)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"kustomize build {overlay}:\n{result.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def _find(resources: list[dict], kind: str, name: str) -> dict:
    for resource in resources:
        if resource["kind"] == kind and resource["metadata"]["name"] == name:
            return resource
    raise AssertionError(f"no {kind} {name!r} in the rendered manifests")


def _pod_spec(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def _container(workload: dict) -> dict:
    (container,) = _pod_spec(workload)["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def _all_variables(resources: list[dict], container: dict) -> dict[str, str | None]:
    """``{name: literal value or None}`` of env and of envFrom ConfigMaps (Secrets: keys unknown)."""
    variables: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config = _find(resources, "ConfigMap", source["configMapRef"]["name"])
            variables.update({key: str(value) for key, value in config.get("data", {}).items()})
    for item in container.get("env", []):
        variables[item["name"]] = item.get("value")
    return variables


def _workloads(resources: list[dict]) -> list[dict]:
    return [r for r in resources if r["kind"] in ("Deployment", "StatefulSet", "CronJob", "Job")]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[dict]]) -> tuple[str, list[dict]]:
    return request.param, rendered[request.param]


# ------------------------------------------------------------------------------ rendering


def test_render_script_is_valid_bash() -> None:
    assert os.access(RENDER_SH, os.X_OK)
    subprocess.run(["bash", "-n", str(RENDER_SH)], check=True)


def test_the_pinned_kustomize_renders(kustomize: str) -> None:
    version = subprocess.run([kustomize, "version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == _pinned_kustomize_version()
    result = subprocess.run([str(RENDER_SH), str(K8S / "base")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert any(d and d["kind"] == "Deployment" for d in yaml.safe_load_all(result.stdout))


def test_every_object_is_namespaced_and_labelled(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    for resource in resources:
        meta = resource["metadata"]
        if resource["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
        else:
            assert meta.get("namespace") == NAMESPACE, _key(resource)
        assert meta["labels"]["app.kubernetes.io/part-of"] == "recstack", _key(resource)


# -------------------------------------------------------------------------------- ranking


def test_ranking_deployment_follows_the_contract(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    deployment = _find(resources, "Deployment", "recstack-ranking")
    container = _container(deployment)
    assert container["command"][:2] == ["recstack", "serve"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464}
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["grpc"] == {"port": 50051, "service": SERVICE_NAME}
    assert liveness["grpc"]["port"] == 50051
    # Liveness asks for the server as a whole (""), so a pod waiting for a model is not restarted.
    assert liveness["grpc"].get("service", "") == ""
    assert container["startupProbe"]["grpc"]["port"] == 50051
    variables = _all_variables(resources, container)
    assert variables["RECSTACK_PORT"] == "50051"
    assert variables["RECSTACK_METRICS_PORT"] == "9464"
    assert {"RECSTACK_REDIS", "RECSTACK_MODELS"} <= set(variables)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9464"
    # The HorizontalPodAutoscaler owns the replica count.
    assert "replicas" not in deployment["spec"]


def test_pods_listen_on_their_ip_and_ranking_requires_its_token(overlay: tuple[str, list[dict]]) -> None:
    """Probes and Prometheus reach a pod at its IP, so the servers bind every interface there
    (explicitly: their default is loopback); beyond loopback the ranking server needs its token,
    so the Secret holding it is required, not optional (a pod without it does not start)."""
    _, resources = overlay
    ranking = _container(_find(resources, "Deployment", "recstack-ranking"))
    command = ranking["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    for name in ("recstack-ranking", "recstack-stream"):
        variables = _all_variables(resources, _container(_find(resources, "Deployment", name)))
        assert variables.get("RECSTACK_METRICS_HOST") == "0.0.0.0", name
    token = _env(ranking)["RECSTACK_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["name"] == "recstack-auth" and token["key"] == "token"
    assert not token.get("optional", False), "the ranking token Secret is optional: auth would be off"
    assert "RECSTACK_INSECURE" not in _all_variables(resources, ranking)


def test_ranking_pods_mount_the_models_read_only(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    ranking = _find(resources, "Deployment", "recstack-ranking")
    trainer = _find(resources, "CronJob", "recstack-trainer")
    models_dir = _all_variables(resources, _container(ranking))["RECSTACK_MODELS"]
    ranking_mount = _mount_at(ranking, models_dir)
    assert ranking_mount["mount"].get("readOnly") is True
    assert ranking_mount["volume"]["persistentVolumeClaim"].get("readOnly") is True
    command = _container(trainer)["command"]
    assert command[:2] == ["recstack", "train"]
    out_dir = command[command.index("--out") + 1]
    trainer_mount = _mount_at(trainer, out_dir)
    assert not trainer_mount["mount"].get("readOnly")
    claim = ranking_mount["volume"]["persistentVolumeClaim"]["claimName"]
    assert trainer_mount["volume"]["persistentVolumeClaim"]["claimName"] == claim
    _find(resources, "PersistentVolumeClaim", claim)
    assert trainer["spec"]["concurrencyPolicy"] == "Forbid"


def _mount_at(workload: dict, path: str) -> dict:
    spec = _pod_spec(workload)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in _container(workload).get("volumeMounts", []):
        if mount["mountPath"] == path:
            return {"mount": mount, "volume": volumes[mount["name"]]}
    raise AssertionError(f"{workload['metadata']['name']} mounts nothing at {path}")


def test_ranking_service_autoscaler_and_budget_select_the_pods(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    deployment = _find(resources, "Deployment", "recstack-ranking")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    for name in ("recstack-ranking", "recstack-ranking-headless"):
        service = _find(resources, "Service", name)
        assert service["spec"]["selector"].items() <= pod_labels.items()
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["port"] == 50051 and grpc_port["targetPort"] in ("grpc", 50051)
    assert _find(resources, "Service", "recstack-ranking-headless")["spec"]["clusterIP"] == "None"
    hpa = _find(resources, "HorizontalPodAutoscaler", "recstack-ranking")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "recstack-ranking",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    pdb = _find(resources, "PodDisruptionBudget", "recstack-ranking")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1  # a drain is possible even with one replica


# --------------------------------------------------------------------------------- stream


def _user_events_partitions(resources: list[dict]) -> int:
    topic = _find(resources, "KafkaTopic", "user-events")
    assert topic["spec"].get("topicName", "user-events") == "user-events"
    return int(topic["spec"]["partitions"])


def test_stream_consumers_never_outnumber_the_partitions(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    deployment = _find(resources, "Deployment", "recstack-stream")
    partitions = _user_events_partitions(resources)
    assert partitions == 6
    assert 1 <= deployment["spec"]["replicas"] <= partitions
    # A rolling update must not add a consumer beyond the replica count.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert not any(
        r["kind"] == "HorizontalPodAutoscaler" and r["spec"]["scaleTargetRef"]["name"] == "recstack-stream"
        for r in resources
    )


def test_stream_deployment_follows_the_contract(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    deployment = _find(resources, "Deployment", "recstack-stream")
    container = _container(deployment)
    assert container["command"] == ["recstack", "stream"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 9465}
    variables = _all_variables(resources, container)
    assert variables["RECSTACK_METRICS_PORT"] == "9465"
    assert {"RECSTACK_BOOTSTRAP", "RECSTACK_REDIS", "RECSTACK_GROUP"} <= set(variables)
    assert variables["RECSTACK_TOPIC"] == "user-events"
    assert variables["RECSTACK_DLQ_TOPIC"] == "user-events.dlq"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9465"
    # The event log goes to the volume the trainer reads.
    log_mount = _mount_at(deployment, variables["RECSTACK_EVENT_LOG"])
    trainer = _find(resources, "CronJob", "recstack-trainer")
    command = _container(trainer)["command"]
    events_mount = _mount_at(trainer, command[command.index("--events") + 1])
    claim = log_mount["volume"]["persistentVolumeClaim"]["claimName"]
    assert events_mount["volume"]["persistentVolumeClaim"]["claimName"] == claim


# ---------------------------------------------------------------------------------- kafka


def test_kafka_is_strimzi_kraft_with_both_topics(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    kafka = _find(resources, "Kafka", "recstack")
    annotations = kafka["metadata"]["annotations"]
    assert annotations["strimzi.io/kraft"] == "enabled"
    assert annotations["strimzi.io/node-pools"] == "enabled"
    pools = [r for r in resources if r["kind"] == "KafkaNodePool"]
    assert pools and all(r["metadata"]["labels"]["strimzi.io/cluster"] == "recstack" for r in pools)
    assert {"controller", "broker"} <= {role for pool in pools for role in pool["spec"]["roles"]}
    topics = {
        r["spec"].get("topicName", r["metadata"]["name"]): r for r in resources if r["kind"] == "KafkaTopic"
    }
    assert {"user-events", "user-events.dlq", "rank-impressions"} <= set(topics)
    for topic in topics.values():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "recstack"
        replicas = topic["spec"]["replicas"]
        assert int(topic["spec"]["config"]["min.insync.replicas"]) <= replicas
        assert replicas <= sum(pool["spec"]["replicas"] for pool in pools)
    bootstrap = _find(resources, "ConfigMap", "recstack-endpoints")["data"]["kafka-bootstrap"]
    assert bootstrap == "recstack-kafka-bootstrap:9092"  # Strimzi's <cluster>-kafka-bootstrap Service
    listener_ports = {listener["port"] for listener in kafka["spec"]["kafka"]["listeners"]}
    assert 9092 in listener_ports


def test_stream_kafka_user_may_do_what_the_consumer_does(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    user = _find(resources, "KafkaUser", "recstack-stream")
    grants = {
        (acl["resource"]["type"], acl["resource"]["name"]): set(acl["operations"])
        for acl in user["spec"]["authorization"]["acls"]
    }
    variables = _all_variables(resources, _container(_find(resources, "Deployment", "recstack-stream")))
    assert {"Read", "Describe"} <= grants[("topic", variables["RECSTACK_TOPIC"])]
    assert "Write" in grants[("topic", variables["RECSTACK_DLQ_TOPIC"])]
    assert "Read" in grants[("group", variables["RECSTACK_GROUP"])]


# ------------------------------------------------------------------------ env and references


def _subcommand_flags() -> dict[str, set[str]]:
    from recstack.cli import build_parser
    from recstack.flags import env_name

    flags: dict[str, set[str]] = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags[name] = {
                    env_name(o) for a in sub._actions for o in a.option_strings if o.startswith("--")
                }
    return flags


def _variables_read_by_the_code() -> set[str]:
    """``RECSTACK_*`` names the code reads directly (e.g. RECSTACK_AUTH_TOKEN, RECSTACK_FEAST_DIR)."""
    found: set[str] = set()
    for folder in ("recstack", "services", "feature_store", "models"):
        for path in (ROOT / folder).rglob("*.py"):
            found.update(re.findall(r"[\"'](RECSTACK_[A-Z0-9_]+)[\"']", path.read_text(errors="replace")))
    return found


@pytest.mark.parametrize(
    ("kind", "name", "subcommand"),
    [("Deployment", "recstack-ranking", "serve"), ("Deployment", "recstack-stream", "stream")],
)
def test_recstack_variables_are_real_flags(
    overlay: tuple[str, list[dict]], kind: str, name: str, subcommand: str
) -> None:
    _, resources = overlay
    container = _container(_find(resources, kind, name))
    assert container["command"][:2] == ["recstack", subcommand]
    flags = _subcommand_flags()
    if subcommand not in flags:
        pytest.skip(f"`recstack {subcommand}` is not in this checkout yet")
    known = flags[subcommand] | _variables_read_by_the_code() | PENDING_STREAM_FLAGS
    unknown = {v for v in _all_variables(resources, container) if v.startswith("RECSTACK_")} - known
    assert not unknown, (
        f"{name}: {sorted(unknown)} are neither flags of `recstack {subcommand}` nor read by the code"
    )


def test_kafka_sasl_variables_are_flags() -> None:
    assert PENDING_STREAM_FLAGS <= _subcommand_flags().get("stream", set())


def test_trainer_command_follows_the_contract(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    command = _container(_find(resources, "CronJob", "recstack-trainer"))["command"]
    assert command[:2] == ["recstack", "train"]
    assert "--events" in command and "--out" in command
    flags = _subcommand_flags()
    if "train" in flags:
        options = {part for part in command[2:] if part.startswith("--")}
        from recstack.flags import env_name

        assert {env_name(o) for o in options} <= flags["train"]


def test_env_references_resolve(overlay: tuple[str, list[dict]]) -> None:
    name, resources = overlay
    secrets_made_elsewhere = {
        # Strimzi writes a Secret per KafkaUser, named like it.
        *(r["metadata"]["name"] for r in resources if r["kind"] == "KafkaUser"),
    }
    if name == "base":
        # Created by the operator before applying (docs/OPERATIONS.md): the Redis chart's password
        # (its values.yaml) and the ranking API's bearer token.
        secrets_made_elsewhere |= {"recstack-redis-cluster", "recstack-auth"}
    for workload in _workloads(resources):
        for container in _pod_spec(workload)["containers"]:
            defined: set[str] = set()
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                resource = _find(resources, kind, ref["name"])
                defined |= set(resource.get("data", {})) | set(resource.get("stringData", {}))
            for item in container.get("env", []):
                for ref_value in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(item.get("value", ""))):
                    assert ref_value in defined, f"{item['name']} uses $({ref_value}) before it is defined"
                source = item.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in _find(resources, "ConfigMap", ref["name"])["data"], ref
                elif "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    if ref.get("optional") or ref["name"] in secrets_made_elsewhere:
                        pass
                    else:
                        secret = _find(resources, "Secret", ref["name"])
                        keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
                        assert ref["key"] in keys, ref
                defined.add(item["name"])


def test_volumes_and_claims_resolve(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    for workload in _workloads(resources):
        spec = _pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (workload["metadata"]["name"], mount["name"])
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                _find(resources, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_every_container_has_requests_and_a_memory_limit(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    for workload in _workloads(resources):
        for container in _pod_spec(workload)["containers"]:
            resources_ = container.get("resources", {})
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(resources_.get("requests", {})), where
            assert "memory" in resources_.get("limits", {}), where


def test_recstack_pods_run_unprivileged(overlay: tuple[str, list[dict]]) -> None:
    _, resources = overlay
    for workload in _workloads(resources):
        spec = _pod_spec(workload)
        if not _container(workload)["image"].startswith("recstack"):
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfile's user
        assert spec.get("automountServiceAccountToken") is False
        context = _container(workload)["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]


# ---------------------------------------------------------------------------------- overlays


def test_base_image_and_local_overlay(rendered: dict[str, list[dict]]) -> None:
    base, local = rendered["base"], rendered["overlays/local"]
    images = {
        overlay: {
            _container(w)["image"] for w in _workloads(resources) if w["metadata"]["name"] != "recstack-redis"
        }
        for overlay, resources in (("base", base), ("local", local))
    }
    assert images == {
        "base": {"recstack:0.1.0"},
        "local": {"recstack:local"},
    }  # local: `docker compose build`
    assert _find(local, "Deployment", "recstack-stream")["spec"]["replicas"] == 1
    assert _find(local, "HorizontalPodAutoscaler", "recstack-ranking")["spec"]["minReplicas"] == 1
    assert _find(local, "KafkaNodePool", "recstack-dual")["spec"]["replicas"] == 1
    for kind, name in (("Deployment", "recstack-ranking"), ("Deployment", "recstack-stream")):
        base_cpu = _container(_find(base, kind, name))["resources"]["requests"]["cpu"]
        local_cpu = _container(_find(local, kind, name))["resources"]["requests"]["cpu"]
        assert _millicores(local_cpu) < _millicores(base_cpu), name
    for claim in (r for r in local if r["kind"] == "PersistentVolumeClaim"):
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    for claim in (r for r in base if r["kind"] == "PersistentVolumeClaim"):
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # shared across nodes
    # The local overlay swaps the Redis Cluster for one server (test_every_redis_setting_...).
    assert _find(local, "ConfigMap", "recstack-endpoints")["data"]["redis-url"].startswith("redis://")
    assert _find(base, "ConfigMap", "recstack-endpoints")["data"]["redis-url"].startswith("redis+cluster://")


def _millicores(value: str) -> int:
    return int(value[:-1]) if value.endswith("m") else int(float(value) * 1000)


# ------------------------------------------------------------------------------ Redis Cluster


def test_redis_cluster_values_and_feast_config_agree(rendered: dict[str, list[dict]]) -> None:
    base = rendered["base"]
    _, values = _helm_redis()
    assert values["cluster"]["nodes"] >= 3 * (1 + values["cluster"]["replicas"])  # >= 3 primaries
    assert values["usePassword"] is True
    assert "maxmemory-policy noeviction" in values["redis"]["configmap"]
    feast = yaml.safe_load(_find(base, "ConfigMap", "recstack-feast")["data"]["feature_store.yaml"])
    assert feast["project"] == "recstack"
    assert (
        feast["entity_key_serialization_version"]
        == yaml.safe_load((ROOT / "feature_store" / "feature_store.yaml").read_text())[
            "entity_key_serialization_version"
        ]
    )
    # A Redis Cluster has database 0 only: the URL names none other.
    url = _find(base, "ConfigMap", "recstack-endpoints")["data"]["redis-url"]
    assert urlsplit(url).path in ("", "/", "/0")


# ------------------------------------------------------------- one Redis, named the same way


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _pod_env(resources: list[dict], container: dict, secrets: dict[str, tuple[str, str]]) -> dict[str, str]:
    """The container's environment as the pod sees it: ConfigMap keys read, ``$(VAR)`` expanded.
    A Secret key reads as a placeholder word recorded in ``secrets`` (placeholder -> (name, key))."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = _find(resources, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
            values.update({key: str(value) for key, value in data.items()})
    for item in container.get("env", []):
        if "value" in item:
            value = _VAR.sub(lambda m: values.get(m.group(1), m.group(0)), str(item["value"]))
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            value = str(_find(resources, "ConfigMap", ref["name"])["data"][ref["key"]])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            value = f"secretref{len(secrets)}"
            secrets[value] = (ref["name"], ref["key"])
        values[item["name"]] = value
    return values


def _helm_redis() -> tuple[str, dict]:
    """The Helm release of infra/k8s/redis/values.yaml (named in its install command) and its values."""
    text = (K8S / "redis" / "values.yaml").read_text()
    match = re.search(r"helm install (\S+) \S*redis-cluster\b", text)
    assert match, "infra/k8s/redis/values.yaml names no `helm install RELEASE ...redis-cluster` command"
    return match.group(1), yaml.safe_load(text)


def _redis_servers(resources: list[dict]) -> dict[str, dict]:
    """``{"host:port": {"cluster": bool, "secret": (name, key)}}`` of every Redis an overlay offers:
    the Helm chart's Redis Cluster (base) and Redis Deployments behind a Service (local)."""
    release, values = _helm_redis()
    servers = {
        f"{release}:6379": {
            "cluster": True,  # the redis-cluster chart; its client Service listens on 6379
            "secret": (values["existingSecret"], values["existingSecretPasswordKey"]),
        }
    }
    for service in (r for r in resources if r["kind"] == "Service"):
        selector = service["spec"].get("selector", {})
        for workload in (w for w in _workloads(resources) if w["kind"] != "CronJob"):
            labels = workload["spec"]["template"]["metadata"]["labels"]
            container = _container(workload)
            if not selector or not selector.items() <= labels.items() or "redis" not in container["image"]:
                continue
            args = [str(a) for a in container.get("args", []) + container.get("command", [])]
            secrets: dict[str, tuple[str, str]] = {}
            env = _pod_env(resources, container, secrets)
            password = None
            if "--requirepass" in args:  # $(VAR) of the pod's environment, as Kubernetes expands it
                given = args[args.index("--requirepass") + 1]
                match = _VAR.fullmatch(given)
                password = env[match.group(1)] if match else given
            cluster = "--cluster-enabled" in args and args[args.index("--cluster-enabled") + 1] == "yes"
            for port in service["spec"]["ports"]:
                servers[f"{service['metadata']['name']}:{port['port']}"] = {
                    "cluster": cluster,
                    "secret": secrets.get(password) if password else None,
                }
    return servers


def test_every_redis_setting_names_one_redis_the_same_way(overlay: tuple[str, list[dict]]) -> None:
    """RECSTACK_REDIS of each workload, its password and the Feast ConfigMap agree with the Redis
    the overlay runs: a Redis Cluster takes redis+cluster:// and redis_type redis_cluster, one
    server redis:// and redis; the same address; the password from the Secret the server reads."""
    from feature_store.store import connection_string
    from recstack.credentials import resolve_redis_url
    from recstack.redis_url import is_cluster, parse_cluster

    name, resources = overlay
    servers = _redis_servers(resources)
    clients = 0
    urls = set()
    for workload in _workloads(resources):
        container = _container(workload)
        secrets: dict[str, tuple[str, str]] = {}
        env = _pod_env(resources, container, secrets)
        if "RECSTACK_REDIS" not in env:
            continue
        clients += 1
        where = f"{name}: {workload['metadata']['name']}"
        url = resolve_redis_url(env["RECSTACK_REDIS"], env.get("RECSTACK_REDIS_PASSWORD"), None)
        if is_cluster(url):
            parsed = parse_cluster(url)
            addresses, password = [f"{h}:{p}" for h, p in parsed.nodes], parsed.password
        else:
            parts = urlsplit(url)
            assert parts.scheme in ("redis", "rediss"), f"{where}: {url}"
            addresses, password = [f"{parts.hostname}:{parts.port or 6379}"], parts.password
        for address in addresses:
            assert address in servers, f"{where}: RECSTACK_REDIS names {address}, no Redis of this overlay"
            server = servers[address]
            assert is_cluster(url) == server["cluster"], (
                f"{where}: RECSTACK_REDIS is {url.split('://')[0]}:// but {address} is "
                f"{'a Redis Cluster' if server['cluster'] else 'one Redis server'}"
            )
            assert password in secrets, f"{where}: the Redis password does not come from a Secret"
            assert secrets[password] == server["secret"], (
                f"{where}: password from Secret {secrets[password]}, {address} reads {server['secret']}"
            )
        urls.add(url.replace(password, "${REDIS_PASSWORD}") if password else url)
    assert clients >= 2, f"{name}: expected the ranking and stream workloads to use Redis"
    # Every process names the same Redis the same way; Feast's configuration is the one open_store
    # builds from that URL (the password expanded by Feast from REDIS_PASSWORD).
    assert len(urls) == 1, f"{name}: the workloads name Redis differently: {sorted(urls)}"
    (url,) = urls
    feast = yaml.safe_load(_find(resources, "ConfigMap", "recstack-feast")["data"]["feature_store.yaml"])
    online = feast["online_store"]
    assert online["type"] == "redis"
    assert online["redis_type"] == ("redis_cluster" if is_cluster(url) else "redis"), (
        f"{name}: Feast redis_type {online['redis_type']} for {url.split('://')[0]}://"
    )
    assert online["connection_string"] == connection_string(url), name
