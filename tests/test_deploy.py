"""The docker-compose topology on loopback: two replicas behind real nginx, real Prometheus.

The replicas are ``cnn-codes serve`` processes; nginx runs ``deploy/nginx/cnn-codes.conf.template``
rendered the way the official nginx image renders it in ``docker-compose.yml``; Prometheus runs
the scrape job of ``deploy/prometheus/prometheus.yml`` with the replicas as static targets
(Docker's DNS finds them in compose). Every query of the Grafana dashboard runs against it.
nginx and Prometheus come from Debian (``scripts/install-deploy-deps.sh``, run by ``make test``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml

from conftest import REPO_ROOT, Server, free_port, metric, wait_until

DEPLOY = REPO_ROOT / "deploy"
TEMPLATE = DEPLOY / "nginx" / "cnn-codes.conf.template"
TIMEOUT = 60.0


def binary(name: str, *extra_dirs: str) -> str:
    """Path of a system binary; a failure in CI (``make test`` installs it), else a skip."""
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in extra_dirs if (Path(d) / name).is_file()), None)
    if found is None:
        message = f"{name} not installed (scripts/install-deploy-deps.sh installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def render(template: str, values: dict[str, str]) -> str:
    """Substitute ``${NAME}`` for the given names only, as the nginx image's envsubst does."""
    names = set(re.findall(r"\$\{(\w+)\}", template))
    missing = names - values.keys()
    assert not missing, f"template variables without a value: {missing}"
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], template)



class Process:
    """A system process with its log in a file; stopped by :meth:`stop`."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self._log = open(log, "w")
        self.log_path = log
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def topology(published: dict, tmp_path_factory: pytest.TempPathFactory):
    nginx_bin = binary("nginx", "/usr/sbin")
    prometheus_bin = binary("prometheus")
    tmp = tmp_path_factory.mktemp("deploy")
    model = f"{published['name']}:{published['version']}"
    started: list = []
    try:
        replicas = [Server(published["repository"], model, tmp) for _ in range(2)]
        started += replicas
        for replica in replicas:
            replica.wait_ready()

        http_port, grpc_port, prom_port = free_port(), free_port(), free_port()
        site = render(TEMPLATE.read_text(), {
            "CNN_CODES_HTTP_UPSTREAMS": " ".join(f"server 127.0.0.1:{r.port};" for r in replicas),
            "CNN_CODES_GRPC_UPSTREAMS": " ".join(f"server {r.grpc_url};" for r in replicas),
            "CNN_CODES_LB_HTTP_LISTEN": f"127.0.0.1:{http_port}",
            "CNN_CODES_LB_GRPC_LISTEN": f"127.0.0.1:{grpc_port}",
        })
        (tmp / "cnn-codes.conf").write_text(site)
        # the main nginx.conf of the nginx image, with every path inside tmp (no root needed)
        (tmp / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/cnn-codes.conf;
}}
""")
        check = subprocess.run([nginx_bin, "-t", "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        nginx = Process([nginx_bin, "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                        tmp / "nginx.log")
        started.append(nginx)

        # the committed scrape job, with the replicas as static targets and a 1 s interval
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        job = config["scrape_configs"][0]
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{r.port}" for r in replicas]}]
        config["global"]["scrape_interval"] = "1s"
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = Process([prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}",
                              f"--storage.tsdb.path={tmp / 'tsdb'}",
                              f"--web.listen-address=127.0.0.1:{prom_port}"],
                             tmp / "prometheus.log")
        started.append(prometheus)
        lb = f"http://127.0.0.1:{http_port}"
        prom = f"http://127.0.0.1:{prom_port}"

        def up() -> bool:
            try:
                return (httpx.get(f"{lb}/readyz", timeout=2).status_code == 200
                        and httpx.get(f"{prom}/-/ready", timeout=2).status_code == 200)
            except httpx.HTTPError:
                return False

        wait_until(up, "nginx and Prometheus")
        yield {"replicas": replicas, "lb": lb, "lb_grpc": f"127.0.0.1:{grpc_port}",
               "prometheus": prom, "job": job["job_name"]}
    finally:
        for process in reversed(started):
            process.stop()


def query(prometheus: str, expr: str) -> list[dict]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=TIMEOUT).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_nginx_spreads_http_and_grpc_over_replicas(topology, published, data_dir):
    replicas, lb = topology["replicas"], topology["lb"]
    photo = sorted((data_dir / "val" / "bees").glob("*.jpg"))[0].read_bytes()
    before = [metric(r.url, "cnn_codes_images_total", protocol="http", outcome="ok")
              for r in replicas]
    vectors = []
    with httpx.Client(base_url=lb, timeout=TIMEOUT) as client:
        for _ in range(12):
            response = client.post("/embed", files=[("images", ("b.jpg", photo, "image/jpeg"))])
            assert response.status_code == 200, response.text
            vectors.append(response.json()["results"][0]["embedding"])
        # a 4xx from a replica reaches the client unchanged, as JSON
        bad = client.post("/embed", files=[("images", ("x.jpg", b"", "image/jpeg"))])
        assert bad.status_code == 200 and bad.json()["results"][0]["error"]["code"] == "empty"
    gained = [metric(r.url, "cnn_codes_images_total", protocol="http", outcome="ok") - b
              for r, b in zip(replicas, before)]
    assert sum(gained) == 12 and min(gained) >= 1, gained  # both replicas served
    np.testing.assert_allclose(np.array(vectors), np.array(vectors[:1] * 12), atol=1e-5)

    before = [metric(r.url, "cnn_codes_images_total", protocol="grpc", outcome="ok")
              for r in replicas]
    with triton_grpc.InferenceServerClient(topology["lb_grpc"]) as client:
        assert client.is_server_ready()
        for _ in range(8):
            tensor = triton_grpc.InferInput("images", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([photo], dtype=np.object_))
            result = client.infer(published["name"], [tensor])
            np.testing.assert_allclose(result.as_numpy("embedding")[0]
                                       / np.linalg.norm(result.as_numpy("embedding")[0]),
                                       vectors[0], atol=1e-5)
    gained = [metric(r.url, "cnn_codes_images_total", protocol="grpc", outcome="ok") - b
              for r, b in zip(replicas, before)]
    assert sum(gained) == 8 and min(gained) >= 1, gained


def test_prometheus_scrapes_every_replica_and_the_dashboard_queries_run(topology):
    prom, job = topology["prometheus"], topology["job"]
    replicas = topology["replicas"]
    targets = {f"127.0.0.1:{r.port}" for r in replicas}
    wait_until(lambda: {s["metric"]["instance"] for s in query(prom, f'up{{job="{job}"}} == 1')}
               == targets, "both replicas up in Prometheus")
    # Prometheus' total equals what the replicas report themselves
    direct = sum(metric(r.url, "cnn_codes_images_total") for r in replicas)
    assert direct > 0

    def scraped_total() -> bool:
        result = query(prom, f'sum(cnn_codes_images_total{{job="{job}"}})')
        return bool(result) and float(result[0]["value"][1]) == direct

    wait_until(scraped_total, "Prometheus to scrape the replicas' image counts")
    models = query(prom, "cnn_codes_model_info")
    assert {m["metric"]["instance"] for m in models} == targets

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "cnn-codes.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        query(prom, expr)  # valid PromQL over these metric names
    assert float(query(prom, f'sum(up{{job="{job}"}})')[0]["value"][1]) == 2


def test_a_replica_going_down_fails_no_request_and_shows_in_prometheus(topology, data_dir):
    replicas, lb, prom = topology["replicas"], topology["lb"], topology["prometheus"]
    photo = sorted((data_dir / "val" / "ants").glob("*.jpg"))[0].read_bytes()
    replicas[0].stop()
    with httpx.Client(base_url=lb, timeout=TIMEOUT) as client:
        for _ in range(6):
            response = client.post("/embed", files=[("images", ("a.jpg", photo, "image/jpeg"))])
            assert response.status_code == 200, response.text
    down = f"127.0.0.1:{replicas[0].port}"
    wait_until(lambda: [s for s in query(prom, f'up{{job="{topology["job"]}"}} == 0')
                        if s["metric"]["instance"] == down], "Prometheus to see the replica down")


def test_compose_file_is_valid_and_matches_the_tested_topology(tmp_path):
    compose_file = REPO_ROOT / "docker-compose.yml"
    validate = [sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                "vendor.compose-spec"]
    result = subprocess.run([*validate, str(compose_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load(compose_file.read_text())
    broken = dict(compose, services=dict(compose["services"], lb=dict(
        compose["services"]["lb"], portz=["1:1"])))
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert subprocess.run([*validate, str(tmp_path / "broken.yml")],
                          capture_output=True).returncode != 0  # the validator does check

    services = compose["services"]
    assert {"cnn-codes", "lb", "prometheus", "grafana"} <= services.keys()
    # every host path mounted exists in the repository
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and "model_repository" not in source:
                assert (REPO_ROOT / source).exists(), source
    # the nginx template gets every variable it uses from the lb service, and nothing else
    used = set(re.findall(r"\$\{(\w+)\}", TEMPLATE.read_text()))
    assert used == set(services["lb"]["environment"]), used
    # Prometheus finds the replicas under the compose service name, on the service's HTTP port
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    sd = prometheus["scrape_configs"][0]["dns_sd_configs"][0]
    assert sd["names"] == ["cnn-codes"] and str(sd["port"]) in services["cnn-codes"]["expose"]
    # replicas bind all interfaces in their container (gRPC reads CNN_CODES_HOST)
    assert services["cnn-codes"]["environment"]["CNN_CODES_HOST"] == "0.0.0.0"
