"""docker-compose.yml: validated by a real Compose implementation, and each service's command run on the host.

No Docker engine runs here, so `docker-compose config` (Debian's docker-compose) checks the file, and the
commands it gives the allscore services are run against the local PostgreSQL, Redis and an S3 server.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings, reset_settings_cache
from db.engine import parse_url
from tests.harness.cli import run_allscore
from tests.harness.compose import compose_config
from tests.harness.faults import free_port
from tests.helpers import REPO_ROOT, require_service, stop_process_group
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def rendered(tmp_path: Path) -> dict[str, Any]:
    result = compose_config(REPO_ROOT / ".env.example")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid_and_scalable(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    assert {
        "redis",
        "postgres",
        "s3",
        "createbucket",
        "migrate",
        "worker",
        "sweeper",
        "trainer",
        "flower",
        "review",
    } <= set(services)
    review = services["review"]
    # The review app: on this host only, its session key from the environment, as its least-privilege role.
    assert [str(p).split(":")[0] for p in review["ports"]] == ["127.0.0.1"]
    assert review["environment"]["ALLSCORE_REVIEW_SECRET_KEY"]
    assert review["environment"]["ALLSCORE_DATABASE_URL"].startswith("postgresql+psycopg://allscore_reviewer:")
    assert review["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    worker = services["worker"]
    # `docker compose up --scale worker=N` needs no fixed name and no host port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["ALLSCORE_WORKER_CONCURRENCY"] == "2"
    assert services["trainer"]["profiles"] == ["train"]
    # The worker exports metrics on the compose network and has a health check; the image's health check (the
    # worker's) is off for the other services of the worker image.
    assert worker["environment"]["ALLSCORE_METRICS_PORT"] == "9540"
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.health"]
    assert "ALLSCORE_TF_THREADS" in worker["environment"] and "ALLSCORE_LOG_FORMAT" in worker["environment"]
    for name in ("createbucket", "migrate", "sweeper"):
        assert services[name]["healthcheck"]["test"] == ["NONE"], name
    assert services["prometheus"]["profiles"] == ["monitoring"]  # only with --profile monitoring
    # The migration sets the lab pipelines' role's password.
    assert services["migrate"]["environment"]["ALLSCORE_SUBMITTER_DB_PASSWORD"] == "change-me-submitter"
    redis_cmd = (
        " ".join(services["redis"]["command"])
        if isinstance(services["redis"]["command"], list)
        else services["redis"]["command"]
    )
    assert "--requirepass" in redis_cmd and "--appendonly yes" in redis_cmd
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    for name in ("redis", "postgres", "s3"):
        assert "healthcheck" in services[name], name
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} image must be pinned: {image}"


@pytest.mark.reliability
def test_workers_get_least_privilege_keys_to_the_database_and_the_object_store(
    rendered: dict[str, Any], tmp_path: Path
) -> None:
    import json

    services = rendered["services"]
    # The s3 service writes its identities from the environment at start: run that part of its command here.
    command = services["s3"]["command"][0].replace("$$", "$")
    writes_config, starts_server = command.split(" && exec ", 1)
    assert starts_server.startswith("weed server") and "-s3.config=/tmp/s3.json" in starts_server
    config = tmp_path / "s3.json"
    subprocess.run(
        ["/bin/sh", "-c", writes_config.replace("/tmp/s3.json", str(config))],
        env={**os.environ, **{k: str(v) for k, v in services["s3"]["environment"].items()}},
        check=True,
    )
    identities = {i["name"]: i for i in json.loads(config.read_text())["identities"]}
    assert set(identities["worker"]["actions"]) == {"Read", "List"}
    assert "Write" in identities["admin"]["actions"]
    worker_key = identities["worker"]["credentials"][0]
    admin_key = identities["admin"]["credentials"][0]
    for name in ("worker", "sweeper", "review"):
        env = services[name]["environment"]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
            worker_key["accessKey"],
            worker_key["secretKey"],
        ), name
        role = "allscore_reviewer" if name == "review" else "allscore_worker"
        assert env["ALLSCORE_DATABASE_URL"].startswith(f"postgresql+psycopg://{role}:"), name
    for name in ("createbucket", "trainer"):
        assert services[name]["environment"]["AWS_ACCESS_KEY_ID"] == admin_key["accessKey"], name
    flower = services["flower"]["environment"]
    assert not any(k.startswith("AWS_") or k == "ALLSCORE_DATABASE_URL" for k in flower), flower


@pytest.mark.reliability
def test_required_secrets_fail_fast(tmp_path: Path) -> None:
    lines = [ln for ln in (REPO_ROOT / ".env.example").read_text().splitlines() if not ln.startswith("REDIS_PASSWORD=")]
    env_file = tmp_path / "env"
    env_file.write_text("\n".join(lines) + "\n")
    result = compose_config(env_file)
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr


def _local_env(service: dict[str, Any], overrides: dict[str, str]) -> dict[str, str]:
    """The service's environment from the compose file, with its hosts pointed at this machine's servers."""
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    compose_db = env.get("ALLSCORE_DATABASE_URL")
    env.update(overrides)
    if compose_db and "ALLSCORE_DATABASE_URL" in overrides:
        # The least-privilege role a service logs in as in compose stays its role here (this server trusts
        # local logins, so no password is needed); the owner's URL stays the test's.
        user = parse_url(compose_db).username
        if user in ("allscore_worker", "allscore_reviewer"):
            local = parse_url(overrides["ALLSCORE_DATABASE_URL"]).set(username=user, password=None)
            env["ALLSCORE_DATABASE_URL"] = local.render_as_string(hide_password=False)
    return env


def _run(command: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_allscore(*command, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"}, check=False, timeout=timeout)


def test_each_service_command_runs_on_the_host(
    tmp_path: Path,
    s3_settings: Settings,
    pg_empty_url: str,
    synth_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        require_service("Redis", False, str(exc))
    bucket = f"compose-{uuid.uuid4().hex[:10]}"
    result = compose_config(REPO_ROOT / ".env.example", S3_BUCKET=bucket)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    local = {
        "ALLSCORE_HOME": str(tmp_path / "home"),
        "ALLSCORE_DATABASE_URL": pg_empty_url,
        "ALLSCORE_BROKER_URL": "redis://127.0.0.1:6379/0",
        "ALLSCORE_QUEUE": f"compose-{uuid.uuid4().hex[:8]}",
        "ALLSCORE_S3_ENDPOINT_URL": s3_settings.s3_endpoint_url or "",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "ALLSCORE_ALLOWED_ROOTS": f'["s3://{bucket}", "{tmp_path}"]',
    }

    # createbucket: the bucket does not exist, then does.
    create = _run(services["createbucket"]["command"], _local_env(services["createbucket"], local))
    assert create.returncode == 0, create.stderr
    assert "created" in create.stdout

    # migrate: the database gets the analyst views.
    migrate = _run(services["migrate"]["command"], _local_env(services["migrate"], local))
    assert migrate.returncode == 0, migrate.stderr
    from sqlalchemy import create_engine, inspect

    engine = create_engine(pg_empty_url)
    assert {"sample_results", "cell_results"} <= set(inspect(engine).get_view_names())
    engine.dispose()

    # trainer: its command with the mounted data path pointed at a synthetic set, kept tiny for the test.
    trainer_cmd = [synth_data.as_posix() if part == "/data/train" else part for part in services["trainer"]["command"]]
    train = _run(
        [*trainer_cmd, "--arch", "tiny", "--epochs", "2", "--version", "compose"],
        _local_env(services["trainer"], local),
    )
    assert train.returncode == 0, train.stderr
    ref = train.stdout.strip().splitlines()[-1]
    assert ref == "allscore:compose"

    # worker: the compose command starts a real worker that scores a sample from the S3 store's model.
    env = _local_env(services["worker"], local)
    assert env["ALLSCORE_METRICS_PORT"] == "9540"
    env["ALLSCORE_METRICS_PORT"] = str(free_port())  # 9540 inside the container; any free port on this host
    worker = WorkerProcess(env, tmp_path / "worker.log", concurrency=1)
    worker.cmd = [sys.executable, "-m", "allscore", *services["worker"]["command"]]
    worker.start()
    try:
        # The service's health check, as Docker runs it inside the container, passes once the worker consumes.
        check = services["worker"]["healthcheck"]["test"]
        assert check[0] == "CMD"
        health_cmd = [sys.executable if part == "python" else part for part in check[1:]]

        def healthy() -> bool:
            return (
                subprocess.run(health_cmd, env={**os.environ, **env}, capture_output=True, timeout=30).returncode == 0
            )

        deadline = time.monotonic() + 30
        while not healthy():
            assert time.monotonic() < deadline, "the worker's health check never passed"
            time.sleep(0.5)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        # The test submits as a lab pipeline, not as the worker's role (which cannot create jobs).
        assert "allscore_worker" in env["ALLSCORE_DATABASE_URL"]
        monkeypatch.setenv("ALLSCORE_DATABASE_URL", pg_empty_url)
        reset_settings_cache()
        from worker.cli import wait_for_job
        from worker.client import submit_sample

        samples = tmp_path / "samples"  # inside ALLSCORE_ALLOWED_ROOTS, like /data/samples in compose
        samples.mkdir()
        for path in sorted((synth_data / "fold_0").rglob("*.bmp"))[:6]:
            shutil.copy(path, samples / path.name)
        job = submit_sample("compose-sample", [str(samples)], model_ref=ref)
        (row,) = wait_for_job(job, 1, timeout=120)
        assert (row["status"], row["n_cells"], row["n_failed"]) == ("done", 6, 0)
    finally:
        worker.stop()
    assert not healthy()  # a stopped worker fails its health check

    # review: a user is added with the service's image and role, and its command serves the pages behind a login,
    # reading the scored sample through the views as allscore_reviewer.
    review_env = _local_env(services["review"], local)
    assert "allscore_reviewer" in review_env["ALLSCORE_DATABASE_URL"]
    add = subprocess.run(
        [sys.executable, "-m", "allscore", "users", "add", "lab", "--password-stdin"],
        env={**os.environ, **review_env},
        input="lab-password-1\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert add.returncode == 0, add.stderr
    from tests.harness.review_site import ReviewServer, login

    review_cmd = services["review"]["command"]
    assert review_cmd[:1] == ["review"] and "--port" in review_cmd
    server = ReviewServer(review_env, tmp_path / "review.log", command=review_cmd).start()
    try:
        import httpx

        with httpx.Client(base_url=server.url, follow_redirects=False, timeout=30) as client:
            assert client.get("/").status_code == 303  # to the login page
            assert login(client, "lab", "lab-password-1").status_code == 303
            page = client.get("/")
            assert page.status_code == 200 and "compose-sample" in page.text
    finally:
        server.stop()

    # sweeper: its command, once (it repeats every 300 s in compose), looks at the database and the broker.
    command = services["sweeper"]["command"]
    assert command[:1] == ["sweep"] and "--every" in command
    sweep = _run(command[:1], _local_env(services["sweeper"], local))
    assert sweep.returncode == 0, sweep.stderr
    assert "swept: 0 running past the hard time limit, 0 queued with no message on the broker" in sweep.stderr

    # flower: its command serves the dashboard behind basic auth.
    port = free_port()
    flower_cmd = [part.replace("--port=5555", f"--port={port}") for part in services["flower"]["command"]]
    flower_env = {
        **os.environ,
        **_local_env(services["flower"], local),
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    }
    celery = Path(sys.executable).with_name("celery")
    proc = subprocess.Popen(
        [str(celery), "--app", "worker.celery_app", *flower_cmd],
        env=flower_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status = None
        for _ in range(60):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                time.sleep(0.5)
                continue
            break
        assert status == 401  # basic auth is on
    finally:
        proc.terminate()
        proc.wait(10)


def _promtool() -> str:
    exe = shutil.which("promtool")
    require_service("Prometheus", exe is not None and shutil.which("prometheus") is not None, "install prometheus")
    assert exe is not None
    return exe


def _prometheus_files(service: dict[str, Any], folder: Path, targets: list[str] | None = None) -> Path:
    """The monitoring service's mounted files copied to `folder` at their container paths' names; with `targets`,
    the workers found by compose's DNS replaced by these host:port targets. Returns the config's path."""
    config = None
    for volume in service["volumes"]:
        source_text, target = str(volume).split(":")[:2]
        if not source_text.startswith("/"):
            continue  # the named volume for the time series
        source = Path(source_text)
        assert source.is_file(), f"{source} is mounted into the prometheus service but does not exist"
        text = source.read_text().replace("/etc/prometheus/", f"{folder}/")
        (folder / Path(target).name).write_text(text)
        if target == "/etc/prometheus/prometheus.yml":
            config = folder / Path(target).name
    assert config is not None
    if targets is not None:
        parsed = yaml.safe_load(config.read_text())
        (job,) = parsed["scrape_configs"]
        assert job["dns_sd_configs"] == [{"names": ["worker"], "type": "A", "port": 9540, "refresh_interval": "30s"}], (
            "the workers are found by the compose service name, on ALLSCORE_METRICS_PORT"
        )
        del job["dns_sd_configs"]
        job["static_configs"] = [{"targets": targets}]
        parsed["global"]["scrape_interval"] = "1s"
        config.write_text(yaml.safe_dump(parsed))
    return config


def test_the_onnx_profile_runs_the_tensorflow_free_worker_like_the_worker() -> None:
    result = compose_config(REPO_ROOT / ".env.example", "onnx")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    worker, onnx = services["worker"], services["worker-onnx"]
    assert onnx["profiles"] == ["onnx"] and "profiles" not in worker  # started only with --profile onnx
    assert onnx["build"]["target"] == "worker-onnx" and onnx["image"].startswith("allscore-worker-onnx:")
    assert onnx["environment"]["ALLSCORE_RUNTIME"] == "onnxruntime"
    assert onnx["environment"]["ALLSCORE_PRECISION"] == "auto"  # its int8 export where a version has one
    # Everything else as the worker: the database role, the broker, the health check, the scaling rules.
    same = {k: v for k, v in worker["environment"].items() if k not in ("ALLSCORE_RUNTIME", "ALLSCORE_PRECISION")}
    assert {k: onnx["environment"][k] for k in same} == same
    assert onnx["healthcheck"] == worker["healthcheck"] and onnx["depends_on"] == worker["depends_on"]
    assert "container_name" not in onnx and "ports" not in onnx
    stage = next(ln for ln in (REPO_ROOT / "Dockerfile").read_text().splitlines() if "[serve]" in ln)
    assert "pip install --constraint" in stage


def test_monitoring_profile_runs_prometheus_that_scrapes_the_workers(tmp_path: Path, stack: Any) -> None:
    result = compose_config(REPO_ROOT / ".env.example", "monitoring")
    assert result.returncode == 0, result.stderr
    service = yaml.safe_load(result.stdout)["services"]["prometheus"]
    assert service["profiles"] == ["monitoring"]
    assert [str(p).split(":")[0] for p in service["ports"]] == ["127.0.0.1"]
    assert ":" in service["image"] and not service["image"].endswith(":latest")
    # The files as compose mounts them pass Prometheus's own checks (config, rule file, alert expressions).
    promtool = _promtool()
    checked = tmp_path / "checked"
    checked.mkdir()
    config = _prometheus_files(service, checked)
    run = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 1 rule files found" in run.stdout + run.stderr

    # The service's command on this host, its workers replaced by a real worker that has scored a sample.
    port = free_port()
    stack.start_worker(concurrency=1, ALLSCORE_METRICS_PORT=str(port))
    prefix = stack.upload_sample("monitored", 5)
    job = stack.submit({"monitored": [prefix]})
    stack.wait_final(job, 1, timeout=120)
    served = tmp_path / "served"
    served.mkdir()
    config = _prometheus_files(service, served, targets=[f"127.0.0.1:{port}"])
    web = free_port()
    command = [
        part.replace("/etc/prometheus/prometheus.yml", str(config)).replace("=/prometheus", f"={tmp_path / 'tsdb'}")
        for part in service["command"]
    ]
    proc = subprocess.Popen(
        [shutil.which("prometheus") or "prometheus", *command, f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    import json

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as answer:
            return list(json.loads(answer.read())["data"]["result"])

    try:
        deadline = time.monotonic() + 60
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                found = query('allscore_samples_total{outcome="done"}')
            except OSError:
                found = []
            if found:
                break
            time.sleep(0.5)
        assert [float(r["value"][1]) for r in found] == [1.0]
        assert [float(r["value"][1]) for r in query('up{job="allscore-worker"}')] == [1.0]
        assert [float(r["value"][1]) for r in query("allscore_cells_scored_total")] == [5.0]
        deadline = time.monotonic() + 30
        while not query("allscore:samples_by_status:max") and time.monotonic() < deadline:
            time.sleep(0.5)  # recording rules evaluate every 15 s
        statuses = {r["metric"]["status"]: float(r["value"][1]) for r in query("allscore:samples_by_status:max")}
        assert statuses["done"] == 1.0
        # Every query of the Grafana dashboard runs on this Prometheus (a bad one answers HTTP 400).
        dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "allscore-workers.json").read_text())
        exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
        assert len(exprs) >= 8
        answered = {expr: query(expr) for expr in exprs}
        assert answered["sum(allscore_worker_consuming)"][0]["value"][1] == "1"
    finally:
        stop_process_group(proc, 20)


# -- secrets only from the environment; compose's Redis and PostgreSQL require passwords ---------------------------
# (The read-only analyst role is tested in test_db.py::test_analyst_role_reads_the_views_and_cannot_write.)


@pytest.mark.timeout(90)
def test_every_compose_secret_must_come_from_the_environment(tmp_path: Path) -> None:
    example = (REPO_ROOT / ".env.example").read_text().splitlines()
    secrets = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in example
        if re.match(r"^[A-Z0-9_]*(PASSWORD|SECRET|ACCESS_KEY)[A-Z0-9_]*=", line)
    }
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "ALLSCORE_ANALYST_PASSWORD"} <= set(secrets), secrets
    for name in secrets:
        env_file = tmp_path / f"without-{name}.env"
        env_file.write_text("\n".join(ln for ln in example if not ln.startswith(f"{name}=")) + "\n")
        result = compose_config(env_file)
        assert result.returncode != 0 and name in result.stderr, (name, result.stderr[-500:])
    rendered = compose_config(REPO_ROOT / ".env.example")
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    redis_cmd = services["redis"]["command"]
    redis_cmd = " ".join(redis_cmd) if isinstance(redis_cmd, list) else redis_cmd
    assert f"--requirepass {secrets['REDIS_PASSWORD']}" in redis_cmd.replace('"', "")
    postgres = services["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"] == secrets["POSTGRES_PASSWORD"]
    assert postgres.get("POSTGRES_HOST_AUTH_METHOD", "") not in ("trust", "password")
    # No secret value is written into what is shipped: the compose file, the image or the code. (An access key
    # id is not a secret: the example's is the word "allscore".)
    secret_values = {name: value for name, value in secrets.items() if "ACCESS_KEY" not in name}
    shipped = [REPO_ROOT / "docker-compose.yml", REPO_ROOT / "Dockerfile"]
    for package in ("allscore", "core", "db", "trainer", "worker"):
        shipped += sorted((REPO_ROOT / package).rglob("*.py"))
    for path in shipped:
        body = path.read_text(errors="replace")
        for name, value in secret_values.items():
            assert value not in body, f"{path} holds the value of {name}"
