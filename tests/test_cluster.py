"""Running on a cluster: cluster.yaml against Ray's autoscaler schema, the resources a run asks Ray
for, launch/submit.sh against a real job server, and an autoscaling simulation.

The Ray processes these tests start are their own: a head on free ports with its own --temp-dir,
stopped by killing exactly the processes that carry that temp dir (``ray stop`` would stop every
Ray on the machine, other test runs' included)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose

CLUSTER_YAML = ROOT / "cluster.yaml"
SUBMIT = ROOT / "launch" / "submit.sh"
CONSTRAINTS = ROOT / "launch" / "cluster-constraints.txt"


# ----------------------------------------------------------------------------- cluster.yaml


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate(config: dict) -> dict:
    # NOTE: private autoscaler APIs (what `ray up` runs before it calls the cloud), pinned to
    # ray 2.60 (pyproject: ray>=2.60,<2.61). validate_config alone rejects a valid file
    # ("Missing 'cluster_synced_files'"): prepare_config fills the defaults first.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_validates_against_ray_schema():
    prepared = _validate(_cluster())
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert {"head", "gpu_h100_8x", "gpu_small", "cpu_data"} <= set(types)
    assert types["head"]["resources"].get("GPU", 0) == 0, "the head is a CPU node: driver and data only"
    assert types["cpu_data"]["resources"].get("GPU", 0) == 0
    h100 = types["gpu_h100_8x"]
    assert h100["node_config"]["InstanceType"] == "p5.48xlarge"
    assert h100["resources"]["GPU"] == 8 and h100["resources"]["accelerator_type:H100"] == 1
    assert (h100["min_workers"], h100["max_workers"]) == (0, 8)
    assert (types["gpu_small"]["min_workers"], types["gpu_small"]["max_workers"]) == (0, 4)


@pytest.mark.parametrize("breakage,error", [
    (lambda c: c.update(max_workers="four"), "is not of type 'integer'"),
    (lambda c: c["available_node_types"]["gpu_small"].update(max_workers="four"), "is not of type 'integer'"),
    (lambda c: c.update(not_a_ray_key=1), "Additional properties are not allowed"),
    (lambda c: c.update(head_node_type="no_such_type"), "head_node_type"),
    (lambda c: c["available_node_types"]["gpu_small"].pop("resources"), "resources"),
], ids=["max_workers-str", "node-max_workers-str", "unknown-top-level-key", "bad-head_node_type", "no-resources"])
def test_broken_cluster_yaml_is_rejected(breakage, error):
    config = _cluster()
    breakage(config)
    with pytest.raises(Exception) as e:
        _validate(config)
    assert error in str(e.value)


# Every GPU configuration a README command uses. scaling=gpu_1 / recipe=lora may not exist in
# every checkout (added with the SFT-course recipes): skipped then.
RUN_CONFIGS = ["recipe=smollm3_mid", "recipe=smollm3_sft", "scaling=gpu_1x8", "recipe=lora"]


@pytest.mark.parametrize("override", RUN_CONFIGS)
def test_node_types_cover_the_recipes(override):
    group, option = override.split("=")
    if not (ROOT / "conf" / group / f"{option}.yaml").exists():
        pytest.skip(f"conf/{group}/{option}.yaml not in this checkout")
    s = compose(override).scaling
    assert s.use_gpu
    needed_gpus = s.num_workers * s.gpus_per_worker
    fits = []
    for name, t in _validate(_cluster())["available_node_types"].items():
        res = t["resources"]
        if res.get("GPU", 0) < s.gpus_per_worker:
            continue
        if s.accelerator_type and res.get(f"accelerator_type:{s.accelerator_type}", 0) < 1:
            continue  # Ray would never place these workers there
        workers_per_node = int(res["GPU"] // s.gpus_per_worker)
        assert workers_per_node * s.cpus_per_worker <= res["CPU"], f"{name}: CPUs run out before GPUs"
        if res["GPU"] * t["max_workers"] >= needed_gpus:
            fits.append(name)
    assert fits, f"{override}: no node type holds {s.num_workers} x {s.gpus_per_worker} GPU ({s.accelerator_type})"


def test_cluster_pins_the_tested_ray_and_python():
    import ray

    image = _cluster()["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}"), image
    pins = dict(line.split("==") for line in CONSTRAINTS.read_text().splitlines() if "==" in line and not line.startswith("#"))
    assert pins["ray"] == ray.__version__
    assert pins["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
    assert all(c.startswith("pip install") and "cluster-constraints.txt" in c for c in _cluster()["setup_commands"])


def test_cluster_yaml_holds_no_secrets():
    text = CLUSTER_YAML.read_text()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "HF_TOKEN"):
        assert f"{name}=" not in text and f"{name}:" not in text
    assert "AKIA" not in text


# ----------------------------------------------------------------------------- what a run asks Ray for


def test_scaling_config_asks_for_the_recipe_resources():
    from raysft.run.driver import scaling_config

    sc = scaling_config(compose("recipe=smollm3_mid", "scaling.memory_per_worker_gb=100"))
    assert sc.num_workers == 64 and sc.use_gpu and sc.accelerator_type == "H100" and sc.placement_strategy == "PACK"
    # The bundle Ray Train reserves per worker = what the autoscaler must find on a node type.
    assert sc._resources_per_worker_not_none == {"CPU": 8, "GPU": 1, "memory": 100 * 2**30, "accelerator_type:H100": 0.001}

    cpu = scaling_config(compose())
    assert not cpu.use_gpu and cpu._resources_per_worker_not_none == {"CPU": 1}


def test_data_tasks_ask_for_cpu_only():
    """The data pipeline's actors reserve ``scaling.data_cpus_per_task`` CPUs and nothing else, so they
    run on CPU nodes (head, cpu_data) or spare CPUs, and never make the autoscaler start a GPU node."""
    import inspect

    from raysft.data import pipeline

    src = inspect.getsource(pipeline.build_dataset)
    assert "num_cpus=data_cpus" in src and "num_gpus" not in src and "resources=" not in src
    assert compose("recipe=smollm3_sft").scaling.data_cpus_per_task > 0


# ----------------------------------------------------------------------------- submit.sh (no cluster)


def _fake_ray(tmp_path: Path) -> dict:
    """A ``ray`` on PATH that records its argv and the runtime env it is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ray"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        args = sys.argv[1:]
        env = json.load(open(args[args.index("--runtime-env") + 1]))
        json.dump({{"argv": args, "runtime_env": env}}, open({str(tmp_path / "call.json")!r}, "w"))
        """))
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable}


def test_submit_passes_overrides_through_untouched(tmp_path):
    overrides = ["trainer.max_steps=3", 'monitor.sample_prompts=["What\'s 2 + 2?"]', "storage.name=a b", "--cfg", "job"]
    env = _fake_ray(tmp_path)
    env.update(WANDB_API_KEY="wandb-secret", RAYSFT_FORWARD_ENV="MY_VAR", MY_VAR="x y")
    env.pop("HF_TOKEN", None)
    p = subprocess.run([str(SUBMIT), "--address", "http://10.0.0.1:8265", "--submission-id", "job1", "--no-wait", "--", *overrides],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    call = json.loads((tmp_path / "call.json").read_text())
    argv = call["argv"]
    assert argv[:2] == ["job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://10.0.0.1:8265"
    assert argv[argv.index("--submission-id") + 1] == "job1"
    assert argv[argv.index("--working-dir") + 1] == str(ROOT)  # whatever the caller's cwd
    assert "--no-wait" in argv
    assert argv[argv.index("--") + 1:] == ["python", "-m", "raysft", *overrides]
    renv = call["runtime_env"]
    assert "pip" not in renv and "conda" not in renv and "uv" not in renv
    assert {".git", "runs/", "outputs/"} <= set(renv["excludes"])
    assert renv["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    # Credentials are not forwarded by default (Ray records runtime_env variables in its job table and
    # logs, issue #17): only what RAYSFT_FORWARD_ENV names travels; names are logged, values never.
    assert "WANDB_API_KEY" not in renv["env_vars"] and renv["env_vars"]["MY_VAR"] == "x y"
    assert "HF_TOKEN" not in renv["env_vars"]
    assert "wandb-secret" not in p.stderr and "wandb-secret" not in json.dumps(call)


def test_submit_rejects_unknown_options(tmp_path):
    p = subprocess.run([str(SUBMIT), "--adress", "x", "--", "a=1"], env=_fake_ray(tmp_path), capture_output=True, text=True)
    assert p.returncode == 2 and "unknown option --adress" in p.stderr
    assert not (tmp_path / "call.json").exists()


def test_python_m_raysft_is_the_cli():
    p = subprocess.run([sys.executable, "-m", "raysft", "data.nonexistent_key=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Unknown config key 'data.nonexistent_key'" in p.stderr


# ----------------------------------------------------------------------------- a local Ray head of our own


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray_env(**extra: str) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable,
           # the `ray` and `python` of this interpreter, for the CLI and for the job's entrypoint
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the test session's Ray
    env.update(extra)
    return env


def _stop_ray_under(temp_dir: str, timeout_s: float = 5.0) -> None:
    """Kill the Ray processes of one cluster: those whose command line names its --temp-dir, and
    their children (job drivers). By PID, never by name: other Ray clusters on this machine live on."""
    import psutil

    procs = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and any(temp_dir in a for a in (p.info["cmdline"] or [])):
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class Head:
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    env: dict


@contextlib.contextmanager
def ray_head(*extra_args: str, port: int | None = None, num_cpus: int = 4, env: dict | None = None,
             include_dashboard: bool = True):
    """``ray start --head`` on free ports (GCS on ``port`` if given) with its own temp dir (short:
    Ray's socket paths must stay under 108 characters); stopped on exit by :func:`_stop_ray_under`."""
    from ray._private.services import get_node_ip_address

    temp_dir = tempfile.mkdtemp(prefix="rsft", dir="/tmp")
    free, dash, agent, agent_grpc, client, metrics, rt_env = _free_ports(7)
    # This head's processes ask its own State API (not the test session's Ray: see run/ray_init.py).
    env = {**(env or _ray_env()), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"}
    if not include_dashboard:
        env.pop("RAY_API_SERVER_ADDRESS")
    port = port or free
    cmd = ["ray", "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
           "--object-store-memory=300000000", "--disable-usage-stats", *extra_args]
    cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"] if include_dashboard else ["--include-dashboard=false"]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, f"ray start failed:\n{p.stdout}\n{p.stderr}"
        yield Head(f"{get_node_ip_address()}:{port}", f"http://127.0.0.1:{dash}", temp_dir, env)
    finally:
        _stop_ray_under(temp_dir)


# ----------------------------------------------------------------------------- a real job server


@pytest.fixture(scope="module")
def job_server():
    # `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default): the
    # head gets the time a driver needs to checkpoint at the end of its step (README "Stopping a run").
    with ray_head(num_cpus=4, env=_ray_env(RAY_JOB_STOP_WAIT_TIME_S="60")) as head:
        yield head


def _submit(head: Head, *overrides: str, submission_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SUBMIT), "--address", head.dashboard_url, "--submission-id", submission_id, "--", *overrides],
                          env=head.env, cwd=ROOT, capture_output=True, text=True, timeout=1200)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_job_stop_leaves_a_resumable_checkpoint_and_a_resubmit_continues(job_server, tmp_path):
    """Submit a long run; while it trains, a second driver on this machine with the same storage.name
    refuses (the run's lease); `ray job stop` it once a checkpoint is in storage: SIGTERM, so it
    checkpoints the step it is at and says so; re-submit under the same storage.name: the run
    continues from that checkpoint (logs streamed, overrides intact, exit 0)."""
    from raysft.storage import checkpoints as ckpts

    run_dir = tmp_path / "runs" / "on-cluster"
    common = ["trainer.eval_steps=null", "trainer.save_strategy=steps", "trainer.save_steps=2",
              f"storage.path={tmp_path}/runs", "storage.name=on-cluster"]
    job_id = f"raysft-test-stop-{os.getpid()}"
    p = subprocess.run([str(SUBMIT), "--address", job_server.dashboard_url, "--submission-id", job_id, "--no-wait", "--",
                        "trainer.max_steps=200", "monitor.sample_prompts=[]", *common],
                       env=job_server.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    deadline = time.time() + 900
    while time.time() < deadline and not (run_dir.exists() and ckpts.latest_complete(str(run_dir))):
        time.sleep(1)
    assert ckpts.latest_complete(str(run_dir)), "no checkpoint within 15 min"
    second = subprocess.run([sys.executable, "-m", "raysft", "trainer.max_steps=200", "monitor.sample_prompts=[]", *common],
                            env=_ray_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 9, second.stdout + second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("raysft: error: run on-cluster is being written by ")
    periodic = ckpts.latest_complete(str(run_dir)).step
    stop = subprocess.run(["ray", "job", "stop", job_id, "--address", job_server.dashboard_url],
                          env=job_server.env, capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = subprocess.run(["ray", "job", "status", job_id, "--address", job_server.dashboard_url],
                            env=job_server.env, capture_output=True, text=True, timeout=120)
    assert "was stopped" in status.stdout + status.stderr
    saved = ckpts.latest_complete(str(run_dir))
    logs = subprocess.run(["ray", "job", "logs", job_id, "--address", job_server.dashboard_url],
                          env=job_server.env, capture_output=True, text=True, timeout=120).stdout
    assert f"raysft: stopped at step {saved.step} (checkpoint at step {saved.step} in {saved.uri}) — run the same " \
           "command to resume" in logs, logs[-3000:]
    assert saved.step > periodic  # the step SIGTERM found it at, not the last periodic checkpoint
    # The data cursor: every step took 2 workers x 1 row x 1 accumulation step.
    assert saved.step >= 2 and saved.state["data_cursor"]["global_row"] == saved.step * 2

    prompt = "What's 2 + 2?"
    target = saved.step + 2
    p = _submit(job_server, f"trainer.max_steps={target}", f'monitor.sample_prompts=["{prompt}"]',
                "monitor.sample_max_new_tokens=4", *common, submission_id=f"raysft-test-resume-{os.getpid()}")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert f"raysft: resuming from step {saved.step}" in out, out[-6000:]
    assert f"step {target}/{target}" in out, out[-6000:]  # progress lines streamed back from the workers
    assert "raysft: done." in out
    steps = [json.loads(x)["global_step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps[-2:] == [saved.step + 1, target]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["monitor"]["sample_prompts"] == [prompt]  # spaces, quote and '?' intact
    assert cfg["trainer"]["max_steps"] == target and cfg["trainer"]["eval_steps"] is None


@pytest.mark.ray
@pytest.mark.slow
def test_submit_reports_a_failed_job(job_server):
    p = _submit(job_server, "data.nonexistent_key=1", submission_id=f"raysft-test-bad-{os.getpid()}")
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-4000:]  # the driver's exit code: a config error
    assert "Unknown config key 'data.nonexistent_key'" in out  # the job's own message, from its logs


# ----------------------------------------------------------------------------- autoscaling simulation

# ray's fake_multinode example.yaml (missing from the pip wheel, so AutoscalingCluster cannot load it).
FAKE_MULTINODE_BASE = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {},
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


def _autoscaling_cluster_class():
    from ray.cluster_utils import AutoscalingCluster

    class OwnAutoscalingCluster(AutoscalingCluster):
        """``AutoscalingCluster`` with an inline base config, on free ports and its own temp dir.
        Upstream ``start()``/``shutdown()`` run ``ray stop --force`` (every Ray on the machine) and
        use the default ports; these start and stop only this cluster's processes."""

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            from ray._private.services import get_node_ip_address

            self.port = _free_ports(1)[0]
            config = copy.deepcopy(FAKE_MULTINODE_BASE)
            config["provider"]["gcs_address"] = f"{get_node_ip_address()}:{self.port}"  # fake nodes join this head
            config["available_node_types"] = copy.deepcopy(worker_node_types)
            config["available_node_types"]["ray.head.default"] = {"resources": dict(head_resources), "node_config": {},
                                                                  "max_workers": 0}
            config.update(config_kwargs)
            return config

        @contextlib.contextmanager
        def running(self):
            fd, config_file = tempfile.mkstemp(suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(self._config, f)
            head = dict(self._head_resources)
            env = _ray_env(AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1")
            try:
                with ray_head(f"--autoscaling-config={config_file}", port=self.port, num_cpus=int(head.pop("CPU", 0)),
                              env=env, include_dashboard=False) as h:
                    yield h
            finally:
                os.unlink(config_file)

    return OwnAutoscalingCluster


AUTOSCALE_DRIVER = r"""
import json, sys, time
import ray
from ray.util.placement_group import placement_group, remove_placement_group

address, bundle, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
ray.init(address=address, log_to_driver=False)
def alive():
    return [x for x in ray.nodes() if x["Alive"]]
def node_of(node_id):
    return next(x for x in ray.nodes() if x["NodeID"] == node_id)["Resources"]
out = {"start_nodes": len(alive())}

# 1. CPU-only work (what the data pipeline asks for): the head has 0 CPU, so a CPU node must start.
@ray.remote(num_cpus=1)
def where():
    time.sleep(1)
    return ray.get_runtime_context().get_node_id()
t = time.time()
out["cpu_task_node"] = node_of(ray.get(where.remote(), timeout=180))
out["cpu_scale_up_s"] = round(time.time() - t, 1)

# 2. The placement group Ray Train reserves for its workers (scaling_config's per-worker bundle).
t = time.time()
pg = placement_group([bundle] * n, strategy="PACK")
ray.get(pg.ready(), timeout=180)
out["gpu_scale_up_s"] = round(time.time() - t, 1)
table = ray.util.placement_group_table(pg)
out["pg_nodes"] = [node_of(table["bundles_to_node_id"][i]) for i in range(n)]
out["peak_nodes"] = len(alive())
remove_placement_group(pg)

# 3. Idle nodes go away after idle_timeout_minutes.
t = time.time()
while len(alive()) > 1 and time.time() - t < 240:
    time.sleep(2)
out["end_nodes"] = len(alive())
out["scale_down_s"] = round(time.time() - t, 1)
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.serial
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_autoscaler_starts_the_node_type_a_run_asks_for():
    """Ray's fake multi-node provider: node types shaped like cluster.yaml's (a CPU node, an H100
    node and an L4 node, 1 GPU each here); the run's Ray Train bundle starts H100 nodes only, CPU-only
    work starts the CPU node only, and both go away after the idle timeout (0.2 min)."""
    from raysft.run.driver import scaling_config

    sc = scaling_config(compose("scaling=gpu_8x8", "scaling.num_workers=2", "scaling.cpus_per_worker=1"))
    bundle = sc._resources_per_worker_not_none  # {"CPU": 1, "GPU": 1, "accelerator_type:H100": 0.001}
    small = {"object_store_memory": 100_000_000}
    cluster = _autoscaling_cluster_class()(
        head_resources={"CPU": 0},
        worker_node_types={
            "cpu_data": {"resources": {"CPU": 1, **small}, "node_config": {}, "min_workers": 0, "max_workers": 1},
            "gpu_h100": {"resources": {"CPU": 1, "GPU": 1, "accelerator_type:H100": 1, **small}, "node_config": {},
                         "min_workers": 0, "max_workers": 2},
            "gpu_small": {"resources": {"CPU": 1, "GPU": 1, "accelerator_type:L4": 1, **small}, "node_config": {},
                          "min_workers": 0, "max_workers": 2},
        },
        idle_timeout_minutes=0.2,
    )
    with cluster.running() as head:
        p = subprocess.run([sys.executable, "-c", AUTOSCALE_DRIVER, head.gcs_address, json.dumps(bundle), str(sc.num_workers)],
                           env=head.env, capture_output=True, text=True, timeout=800)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, f"driver failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    out = json.loads(line[len("RESULT "):])
    print(out)
    assert out["start_nodes"] == 1
    assert out["cpu_task_node"].get("GPU", 0) == 0, "CPU-only work started a GPU node"
    assert all(r.get("accelerator_type:H100") == 1 for r in out["pg_nodes"]), out["pg_nodes"]
    assert out["peak_nodes"] >= 1 + sc.num_workers  # head + 2 H100 nodes (+ the CPU node, if not yet idle)
    assert out["end_nodes"] == 1, "idle nodes were not removed"
