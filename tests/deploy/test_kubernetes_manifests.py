"""deploy/kubernetes: every kustomization renders, validates offline against
the Kubernetes schema, and keeps the properties the sidecar deployment relies on."""

from __future__ import annotations

import ipaddress
from pathlib import PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from llm_warden.proxy.config import parse_hostport
from tests.deploy.deploy_helpers import (
    DEPLOY,
    KUBERNETES,
    STATE_DIR,
    WARDEN_CONTAINER,
    Rendered,
    all_containers,
    check_config,
    container_port,
    kustomizations,
    rendered_for,
)

# The oldest Kubernetes the manifests support (native sidecars are on by
# default since 1.29; the preStop sleep action since 1.30) and the newest
# schema kubernetes-validate ships.
MIN_KUBERNETES = "1.30.0"
NEWEST_KUBERNETES = kubernetes_validate.utils.latest_version()

PROVIDER_KEY_SECRET = "warden-provider"
CRD_GROUPS = {"monitoring.coreos.com"}
WARDEN_SECRETS = {"warden-provider", "warden-jwt", "warden-audit", "warden-admin"}
DATABASE_SECRET = "warden-database"


def _uses_postgres(cfg: dict[str, Any]) -> bool:
    return cfg.get("audit", {}).get("backend") == "postgres" or cfg.get("retrieval", {}).get("store") == "postgres"


def test_every_overlay_is_covered() -> None:
    names = {str(p.relative_to(KUBERNETES)) for p in kustomizations()}
    assert {"base", "overlays/sidecar", "overlays/scale-out"} <= names
    assert "components/prometheus-operator" not in names, "a Component is rendered through the overlays that use it"


def test_renders_the_expected_objects(rendered: Rendered) -> None:
    kinds = sorted({o["kind"] for o in rendered.objects})
    for kind in ("ConfigMap", "Deployment", "NetworkPolicy", "Service", "ServiceAccount"):
        assert kind in kinds, f"{rendered.name} renders no {kind}"
    if rendered.name.startswith("overlays/"):
        assert "ServiceMonitor" in kinds, f"{rendered.name}: the example overlays include the prometheus-operator component"
    else:
        assert "ServiceMonitor" not in kinds, "the base must apply on clusters without the Prometheus Operator"
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in rendered.objects]
    assert len(names) == len(set(names)), "duplicate objects"


@pytest.mark.parametrize("version", [MIN_KUBERNETES, NEWEST_KUBERNETES])
def test_objects_validate_against_kubernetes_schema(rendered: Rendered, version: str) -> None:
    """Strict: an unknown or misspelt field is an error.  Schemas ship in the package (offline)."""
    checked = 0
    for obj in rendered.objects:
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue  # CRDs: see test_servicemonitor_is_structurally_valid
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} @ {version}: {path}: {e.message}") from None
        checked += 1
    assert checked == len(rendered.objects) - len(rendered.of_kind("ServiceMonitor"))


def test_schema_validation_catches_errors() -> None:
    """The validator is really strict: a misspelt securityContext field fails."""
    dep = rendered_for(KUBERNETES / "base").deployment
    bad = {**dep, "spec": {**dep["spec"], "template": {**dep["spec"]["template"]}}}
    pod = dict(bad["spec"]["template"]["spec"])
    pod["securityContext"] = {**pod["securityContext"], "runAsNonroot": True}
    bad["spec"]["template"]["spec"] = pod
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, MIN_KUBERNETES, strict=True)


# A structural schema for the fields of monitoring.coreos.com/v1 ServiceMonitor
# that these manifests use (names and types from the Prometheus Operator CRD).
SERVICEMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def _seconds(duration: str) -> int:
    assert duration.endswith("s") and duration[:-1].isdigit(), duration
    return int(duration[:-1])


def test_servicemonitor_is_structurally_valid(rendered: Rendered) -> None:
    if not rendered.of_kind("ServiceMonitor"):
        assert rendered.name == "base"
        return
    sm = rendered.one("ServiceMonitor")
    jsonschema.validate(sm, SERVICEMONITOR_SCHEMA)
    svc = rendered.one("Service", "warden-metrics")
    labels = svc["metadata"]["labels"]
    for k, v in sm["spec"]["selector"]["matchLabels"].items():
        assert labels.get(k) == v, f"ServiceMonitor selector {k}={v} does not select warden-metrics"
    if "namespace" in sm["metadata"]:
        assert sm["metadata"]["namespace"] == svc["metadata"].get("namespace")
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names
        assert ep["path"] == "/metrics"
        assert _seconds(ep["scrapeTimeout"]) < _seconds(ep["interval"])


def test_config_map_passes_wardens_own_loader(rendered: Rendered) -> None:
    checked = check_config(rendered.config_text)
    cfg = checked.config
    host, _ = parse_hostport(cfg.server.listen, "server.listen")
    assert ipaddress.ip_address(host).is_loopback, "the data plane must be reachable only from inside the pod"
    admin_host, _ = parse_hostport(cfg.server.admin_listen, "server.admin_listen")
    assert admin_host in ("0.0.0.0", "::"), "probes and Prometheus reach the admin plane from outside the pod"
    assert cfg.auth.mode == "jwt"
    assert cfg.audit.enabled and cfg.audit.durability == "sync"


def test_base_config_is_the_image_config() -> None:
    assert (KUBERNETES / "base" / "config.toml").read_bytes() == (DEPLOY / "config.toml").read_bytes()


def _state_paths(raw: dict[str, Any]) -> dict[str, str]:
    keys = {
        "audit.path": ("audit", "path"),
        "retrieval.db": ("retrieval", "db"),
        "retrieval.index_dir": ("retrieval", "index_dir"),
        "policy.state_db": ("policy", "state_db"),
        "limits.idempotency_db": ("limits", "idempotency_db"),
    }
    return {k: raw[s][f] for k, (s, f) in keys.items() if f in raw.get(s, {})}


def test_state_lives_on_the_writable_volume(rendered: Rendered) -> None:
    raw = rendered.config
    paths = _state_paths(raw)
    assert set(paths) == {"audit.path", "retrieval.db", "retrieval.index_dir", "policy.state_db", "limits.idempotency_db"}
    for key, value in paths.items():
        p = PurePosixPath(value)
        assert p.is_absolute() and p.is_relative_to(STATE_DIR), f"{key} = {value!r} is not under {STATE_DIR}"
    assert len(set(paths.values())) == len(paths), "two state files share a path"
    mounts = {m["mountPath"]: m for m in rendered.warden.get("volumeMounts", [])}
    assert STATE_DIR in mounts and not mounts[STATE_DIR].get("readOnly", False)
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly", False)
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    state = volumes[mounts[STATE_DIR]["name"]]
    assert "emptyDir" in state or "persistentVolumeClaim" in state


def test_native_sidecar_shape(rendered: Rendered) -> None:
    pod = rendered.pod
    assert [c["name"] for c in pod["initContainers"]] == [WARDEN_CONTAINER]
    assert rendered.warden["restartPolicy"] == "Always"
    assert WARDEN_CONTAINER not in [c["name"] for c in pod["containers"]]
    assert rendered.warden["args"] == ["--config", "/etc/warden/config.toml"]
    assert pod.get("restartPolicy", "Always") == "Always"


def test_app_reaches_warden_on_loopback(rendered: Rendered) -> None:
    cfg = rendered.config
    _, port = parse_hostport(cfg["server"]["listen"], "server.listen")
    for c in rendered.pod["containers"]:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("OPENAI_BASE_URL") == f"http://127.0.0.1:{port}/v1", c["name"]


def test_probes_on_the_admin_port(rendered: Rendered) -> None:
    w = rendered.warden
    _, admin_port = parse_hostport(rendered.config["server"]["admin_listen"], "server.admin_listen")
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = w[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(w, get["port"]) == admin_port, probe
        assert get.get("scheme", "HTTP") == "HTTP"
    startup = w["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30, "Warden gets at least 30 s to start"
    assert w["readinessProbe"]["failureThreshold"] == 1, "a draining Warden leaves the endpoints at the next probe"


def test_security_context(rendered: Rendered) -> None:
    pod = rendered.pod
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for c in all_containers(pod):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
        assert sc.get("privileged", False) is False, c["name"]
        assert sc.get("runAsNonRoot", psc["runAsNonRoot"]) is True, c["name"]
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        assert isinstance(uid, int) and uid > 0, c["name"]
        assert sc.get("seccompProfile", psc["seccompProfile"])["type"] == "RuntimeDefault", c["name"]
        assert not c.get("ports") or all("hostPort" not in p for p in c["ports"])
    assert rendered.warden["securityContext"]["runAsUser"] == 10001, "the image's USER"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def test_meets_restricted_pod_security_standard(rendered: Rendered) -> None:
    for v in rendered.pod.get("volumes", []):
        types = set(v) - {"name"}
        assert types <= RESTRICTED_VOLUME_TYPES, f"volume {v['name']} of type {types} is not allowed by 'restricted'"
    for ns in rendered.of_kind("Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _secret_refs(container: dict[str, Any], volumes: dict[str, dict[str, Any]]) -> set[str]:
    refs = set()
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs.add(ref["name"])
    for e in container.get("envFrom", []):
        if "secretRef" in e:
            refs.add(e["secretRef"]["name"])
    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        if "secret" in vol:
            refs.add(vol["secret"]["secretName"])
        for src in vol.get("projected", {}).get("sources", []):
            if "secret" in src:
                refs.add(src["secret"]["name"])
    return refs


def test_secrets_only_in_wardens_container(rendered: Rendered) -> None:
    pod = rendered.pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    w = rendered.warden
    cfg = rendered.config
    expected = WARDEN_SECRETS | ({DATABASE_SECRET} if _uses_postgres(cfg) else set())
    assert _secret_refs(w, volumes) == expected
    for c in all_containers(pod):
        if c is not w:
            assert not _secret_refs(c, volumes) & expected, f"{c['name']} can read a Warden secret"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in w["env"] if "valueFrom" in e}
    assert env[cfg["upstream"]["api_key_env"]]["name"] == PROVIDER_KEY_SECRET
    assert cfg["admin"]["token_env"] in env
    if _uses_postgres(cfg):
        assert env[cfg["database"]["dsn_env"]]["name"] == DATABASE_SECRET, "the database URL comes from a Secret, never the config"


def test_key_files_come_from_mounted_secrets(rendered: Rendered) -> None:
    """The files named by [auth] public_key_file and [audit] signing_key_file exist in the mounted Secrets."""
    cfg = rendered.config
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    mounts = rendered.warden["volumeMounts"]
    for key, secret in ((cfg["auth"]["public_key_file"], "warden-jwt"), (cfg["audit"]["signing_key_file"], "warden-audit")):
        path = PurePosixPath(key)
        (m,) = [m for m in mounts if path.is_relative_to(m["mountPath"])]
        assert m.get("readOnly") is True
        vol = volumes[m["name"]]["secret"]
        assert vol["secretName"] == secret
        rel = str(path.relative_to(m["mountPath"]))
        assert rel in {i["path"] for i in vol["items"]}, f"{key} is not a file of Secret {secret}"
        assert vol["defaultMode"] & 0o007 == 0, "key files are not world-readable"


def test_config_mounted_as_a_directory_for_live_reload(rendered: Rendered) -> None:
    """A subPath mount never sees ConfigMap updates; a directory mount does (symlink swap)."""
    (m,) = [m for m in rendered.warden["volumeMounts"] if m["name"] == "warden-config"]
    assert m["mountPath"] == "/etc/warden" and "subPath" not in m and m.get("readOnly") is True
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert volumes["warden-config"]["configMap"]["name"] == rendered.one("ConfigMap", "warden-config")["metadata"]["name"]


def _prestop_sleep(container: dict[str, Any]) -> int:
    return int(container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0))


def test_grace_period_covers_drain(rendered: Rendered) -> None:
    """The kubelet kills at terminationGracePeriodSeconds: it must cover every preStop sleep,
    the application's own shutdown and Warden's drain (native sidecars stop after the app)."""
    drain_s = float(rendered.config["server"].get("drain_s", 20.0))
    pod = rendered.pod
    prestops = sum(_prestop_sleep(c) for c in all_containers(pod))
    assert _prestop_sleep(rendered.warden) > 0 and all(_prestop_sleep(c) > 0 for c in pod["containers"])
    margin = 10
    assert pod["terminationGracePeriodSeconds"] >= drain_s + prestops + margin


# The example application's own shutdown after SIGTERM (it exits at once; a real
# application's allowance goes into terminationGracePeriodSeconds too).
APP_SHUTDOWN_S = 5


def test_grace_period_covers_wardens_exit_bound(rendered: Rendered) -> None:
    """Warden exits at most drain_s + EXIT_MARGIN_S after SIGTERM (proxy/serve.py); the kubelet's
    SIGKILL at terminationGracePeriodSeconds must come after that, the preStop sleeps (the app's,
    then Warden's: native sidecars stop after the app) and the app's own shutdown."""
    from llm_warden.proxy.serve import EXIT_MARGIN_S

    cfg = check_config(rendered.config_text).config
    pod = rendered.pod
    prestops = sum(_prestop_sleep(c) for c in all_containers(pod))
    bound = prestops + cfg.server.drain_s + EXIT_MARGIN_S + APP_SHUTDOWN_S
    assert pod["terminationGracePeriodSeconds"] > bound, f"{rendered.name}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} <= {bound}"


def test_every_shipped_pod_spec_is_rendered_and_checked() -> None:
    """Every manifest under deploy/ that sets terminationGracePeriodSeconds is part of a rendered
    kustomization (so the grace-period tests cover it), and no Helm chart ships unchecked."""
    import yaml

    charts = sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("Chart.yaml"))
    assert not charts, f"Helm chart(s) {charts} ship: render them (helm template) in these tests before shipping"
    rendered_graces = {rendered_for(k).pod["terminationGracePeriodSeconds"] for k in kustomizations()}
    for path in DEPLOY.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            spec = doc.get("spec", {}).get("template", {}).get("spec", {}) if isinstance(doc.get("spec"), dict) else {}
            if "terminationGracePeriodSeconds" in spec:
                assert path.is_relative_to(KUBERNETES), f"{path} sets a grace period outside deploy/kubernetes"
                assert spec["terminationGracePeriodSeconds"] in rendered_graces, f"{path}: its grace period is not in any rendered kustomization"


def test_configs_drain_and_edge_keys_are_sane(rendered: Rendered) -> None:
    """The shipped config keeps the HTTP edge's bounds consistent with the auth limits."""
    cfg = check_config(rendered.config_text).config
    assert 0 < cfg.server.drain_s <= 60
    assert cfg.server.max_header_bytes >= cfg.auth.max_token_bytes + len("Authorization: Bearer "), "a valid token must fit in one header line"
    assert cfg.server.header_timeout_s < cfg.server.keepalive_timeout_s


def test_resources_set(rendered: Rendered) -> None:
    for c in all_containers(rendered.pod):
        res = c["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), f"{c['name']} {kind}"


def test_images_are_pinned(rendered: Rendered) -> None:
    for c in all_containers(rendered.pod):
        image = c["image"]
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and "/" not in tag and tag and tag != "latest"), f"{c['name']}: {image}"


def test_metrics_service_exposes_only_the_admin_port(rendered: Rendered) -> None:
    svc = rendered.one("Service", "warden-metrics")
    (port,) = svc["spec"]["ports"]
    _, admin_port = parse_hostport(rendered.config["server"]["admin_listen"], "server.admin_listen")
    assert container_port(rendered.warden, port["targetPort"]) == admin_port
    assert port["port"] == admin_port
    labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    for k, v in svc["spec"]["selector"].items():
        assert labels.get(k) == v
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_scrape_annotations(rendered: Rendered) -> None:
    ann = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
    _, admin_port = parse_hostport(rendered.config["server"]["admin_listen"], "server.admin_listen")
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(admin_port)
    assert ann["prometheus.io/path"] == "/metrics"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert not selector.get("matchExpressions")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policy_egress_only_to_dns_and_provider(rendered: Rendered) -> None:
    labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    egress = [p for p in rendered.of_kind("NetworkPolicy") if "Egress" in p["spec"]["policyTypes"]]
    assert egress and all(_selects(p["spec"]["podSelector"], labels) for p in egress)
    rules = [r for p in egress for r in p["spec"]["egress"]]
    dns = provider = 0
    for rule in rules:
        assert rule.get("to"), "an egress rule without 'to' allows every destination"
        assert rule.get("ports"), "an egress rule without 'ports' allows every port"
        ports = {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}
        for peer in rule["to"]:
            if "ipBlock" in peer:
                net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                assert net.prefixlen > 0, "0.0.0.0/0 is not 'only the provider'"
                assert ports == {("TCP", 443)}
                provider += 1
            elif peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "kube-system"}:
                assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
                assert ports == {("UDP", 53), ("TCP", 53)}
                dns += 1
            else:
                assert "podSelector" in peer and "namespaceSelector" not in peer, f"unexpected egress peer {peer}"
                assert ports in ({("TCP", 6379)}, {("TCP", 5432)}), "in-namespace egress is only for the shared Redis and PostgreSQL"
    assert dns == 1 and provider >= 1


def test_network_policy_admin_ingress_restricted(rendered: Rendered) -> None:
    (ing,) = [p for p in rendered.of_kind("NetworkPolicy") if "Ingress" in p["spec"]["policyTypes"]]
    _, admin_port = parse_hostport(rendered.config["server"]["admin_listen"], "server.admin_listen")
    for rule in ing["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without 'from' admits everyone"
        assert {p["port"] for p in rule["ports"]} == {admin_port}


# ------------------------------------------------------------------ overlays

def test_sidecar_overlay_single_writer_state() -> None:
    r = rendered_for(KUBERNETES / "overlays" / "sidecar")
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    claim = volumes["warden-state"]["persistentVolumeClaim"]["claimName"]
    pvc = r.one("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert r.deployment["spec"]["replicas"] == 1
    assert r.deployment["spec"]["strategy"] == {"type": "Recreate"}, "a RWO volume cannot be attached to two pods during a rollout"


def test_scale_out_overlay() -> None:
    r = rendered_for(KUBERNETES / "overlays" / "scale-out")
    spec = r.deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    limits = r.config["limits"]
    assert limits["backend"] == "redis" and limits["redis_url"].startswith(("redis://", "rediss://"))
    assert limits.get("fail_open", False) is False
    policy = r.config["policy"]
    assert policy["state_backend"] == "redis" and policy["redis_url"].startswith(("redis://", "rediss://"))
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    assert "persistentVolumeClaim" not in volumes["warden-state"], "replicas must not share one SQLite volume"
    labels = spec["template"]["metadata"]["labels"]
    pdb = r.one("PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"], labels)
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"].get("minAvailable", spec["replicas"]) < spec["replicas"]
    anti = r.pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname" for t in anti)
    assert any(_selects(t["podAffinityTerm"]["labelSelector"], labels) for t in anti)
    assert r.pod["topologySpreadConstraints"]
    redis_rules = [
        rule
        for p in r.of_kind("NetworkPolicy")
        if "Egress" in p["spec"]["policyTypes"]
        for rule in p["spec"]["egress"]
        if any(pt["port"] == 6379 for pt in rule["ports"])
    ]
    assert redis_rules, "Warden must be allowed to reach the shared Redis"
    cfg = r.config
    assert cfg["audit"]["backend"] == "postgres", "no audit record dies with a pod"
    assert cfg["retrieval"]["store"] == "postgres", "one knowledge base for every replica"
    assert "dsn" not in cfg["database"] and cfg["database"]["dsn_env"], "credentials never in the file"
    pg_rules = [
        rule
        for p in r.of_kind("NetworkPolicy")
        if "Egress" in p["spec"]["policyTypes"]
        for rule in p["spec"]["egress"]
        if any(pt["port"] == 5432 for pt in rule["ports"])
    ]
    assert pg_rules, "Warden must be allowed to reach the shared PostgreSQL"


def test_overlays_differ_from_sidecar_only_where_scale_out_needs() -> None:
    sidecar = rendered_for(KUBERNETES / "overlays" / "sidecar").config
    scale = rendered_for(KUBERNETES / "overlays" / "scale-out").config
    fleet = ("limits", "policy", "database", "audit", "retrieval")
    assert {k: v for k, v in sidecar.items() if k not in fleet} == {k: v for k, v in scale.items() if k not in fleet}
    for section, keys in (("audit", ("backend",)), ("retrieval", ("store",))):
        assert {k: v for k, v in sidecar[section].items() if k not in keys} == {k: v for k, v in scale[section].items() if k not in keys}
    shared = ("state_backend", "redis_url", "redis_key_prefix")
    assert {k: v for k, v in sidecar["policy"].items() if k not in shared} == {k: v for k, v in scale["policy"].items() if k not in shared}
