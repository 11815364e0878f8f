"""deploy/prometheus/scrape-config.yaml: structure, and its relabelling replayed
on the targets Prometheus's Kubernetes pod discovery yields for the rendered pod."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_helpers import DEPLOY, KUBERNETES, WARDEN_CONTAINER, rendered_for

SCRAPE = DEPLOY / "prometheus" / "scrape-config.yaml"
ACTIONS = {"replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep", "hashmod", "lowercase", "uppercase", "keepequal", "dropequal"}


@pytest.fixture(scope="module")
def scrape() -> dict[str, Any]:
    data = yaml.safe_load(SCRAPE.read_text())
    assert set(data) == {"scrape_configs"}
    return data


def job(scrape: dict[str, Any], name: str) -> dict[str, Any]:
    (j,) = [j for j in scrape["scrape_configs"] if j["job_name"] == name]
    return j


def _seconds(d: str) -> int:
    m = re.fullmatch(r"(\d+)s", d)
    assert m, d
    return int(m.group(1))


def test_structure(scrape: dict[str, Any]) -> None:
    names = [j["job_name"] for j in scrape["scrape_configs"]]
    assert len(names) == len(set(names))
    for j in scrape["scrape_configs"]:
        assert j.get("metrics_path", "/metrics") == "/metrics"
        if "scrape_timeout" in j:
            assert _seconds(j["scrape_timeout"]) <= _seconds(j["scrape_interval"])
        for rc in j.get("relabel_configs", []):
            assert rc.get("action", "replace") in ACTIONS
            re.compile(rc.get("regex", "(.*)"))
            if rc.get("action", "replace") == "replace":
                assert "target_label" in rc
    k8s = job(scrape, "warden")
    assert k8s["kubernetes_sd_configs"] == [{"role": "pod"}]


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabelling (the keep/drop/replace subset), anchored regexes, ';' separator."""
    labels = dict(labels)
    for rc in configs:
        action = rc.get("action", "replace")
        value = rc.get("separator", ";").join(labels.get(s, "") for s in rc.get("source_labels", []))
        rx = re.compile(rf"^(?:{rc.get('regex', '(.*)')})$")
        m = rx.match(value)
        if action == "keep" and not m:
            return None
        if action == "drop" and m:
            return None
        if action == "replace" and m:
            repl = m.expand(re.sub(r"\$(\d+)", r"\\g<\1>", rc.get("replacement", "$1")))
            if repl:
                labels[rc["target_label"]] = repl
            else:
                labels.pop(rc["target_label"], None)
    return labels


def discovered_targets(overlay: str) -> list[dict[str, str]]:
    """What Prometheus's pod role yields for one pod of the rendered Deployment:
    one target per declared container port, init containers included."""
    r = rendered_for(KUBERNETES / overlay)
    tmpl = r.deployment["spec"]["template"]
    pod_ip = "10.1.2.3"
    common = {"__meta_kubernetes_namespace": r.deployment["metadata"].get("namespace", "default"), "__meta_kubernetes_pod_name": "example-app-abc"}
    for k, v in tmpl["metadata"]["labels"].items():
        common["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
    for k, v in tmpl["metadata"].get("annotations", {}).items():
        common["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", k)] = v
    targets = []
    for init, containers in ((True, tmpl["spec"].get("initContainers", [])), (False, tmpl["spec"]["containers"])):
        for c in containers:
            base = {**common, "__meta_kubernetes_pod_container_name": c["name"], "__meta_kubernetes_pod_container_init": str(init).lower()}
            ports = c.get("ports") or [None]
            for p in ports:
                t = dict(base)
                if p is None:
                    t["__address__"] = pod_ip
                else:
                    t["__address__"] = f"{pod_ip}:{p['containerPort']}"
                    t["__meta_kubernetes_pod_container_port_name"] = p.get("name", "")
                    t["__meta_kubernetes_pod_container_port_number"] = str(p["containerPort"])
                targets.append(t)
    return targets


@pytest.mark.parametrize("overlay", ["overlays/sidecar", "overlays/scale-out"])
def test_pod_discovery_keeps_exactly_the_admin_port(scrape: dict[str, Any], overlay: str) -> None:
    k8s = job(scrape, "warden")
    kept = [t for t in (relabel(t, k8s["relabel_configs"]) for t in discovered_targets(overlay)) if t is not None]
    assert len(kept) == 1, kept
    (t,) = kept
    assert t["__address__"] == "10.1.2.3:9090"
    assert t["__meta_kubernetes_pod_container_name"] == WARDEN_CONTAINER
    assert t["pod"] == "example-app-abc" and t["namespace"] == "example-app" and t["app"] == "example-app"


def test_unannotated_pods_are_not_scraped(scrape: dict[str, Any]) -> None:
    k8s = job(scrape, "warden")
    for t in discovered_targets("overlays/sidecar"):
        t["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] = "false"
        assert relabel(t, k8s["relabel_configs"]) is None


def test_local_job(scrape: dict[str, Any]) -> None:
    local = job(scrape, "warden-local")
    assert local["static_configs"][0]["targets"] == ["127.0.0.1:9090"]
