"""cluster.yaml against Ray's own autoscaler schema, and `ray job submit` end to end.

The e2e test starts its own single-node Ray (`ray start --head --block`, its own temp dir, free
ports and its own token), submits jobs/finetune.py to it through the job server exactly as a user
would against a cloud cluster, and stops only that Ray afterwards (never `ray stop`, which would
kill every Ray on the machine).
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_ports, ray_cli, stop_ray

CLUSTER_YAML = ROOT / "cluster.yaml"
GCP_MARKER = "# ==== GCP (alternative) ===="


def _aws() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _gcp() -> dict:
    """The commented GCP block: everything after the marker, with the leading "# " removed."""
    text = CLUSTER_YAML.read_text()
    assert GCP_MARKER in text, "cluster.yaml has no GCP alternative block"
    block = text.split(GCP_MARKER, 1)[1].splitlines()
    # The block's prose comes first; the config starts at its first top-level key.
    start = next(i for i, line in enumerate(block) if line.startswith("# cluster_name:"))
    lines = []
    for line in block[start:]:
        assert line.startswith("#"), f"uncommented line in the GCP block: {line!r}"
        lines.append(line[2:])
    return yaml.safe_load("\n".join(lines))


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("load", [_aws, _gcp], ids=["aws", "gcp"])
def test_cluster_yaml_passes_rays_autoscaler_schema(load):
    config = load()
    prepared = _validate(config)
    # prepare_config merges the provider's defaults; nothing of ours may be overridden by them.
    assert prepared["head_node_type"] == config["head_node_type"]
    assert prepared["available_node_types"].keys() == config["available_node_types"].keys()
    assert prepared["max_workers"] == config["max_workers"]
    assert prepared["idle_timeout_minutes"] == config["idle_timeout_minutes"]
    assert 0 < prepared["upscaling_speed"] <= 2


@pytest.mark.parametrize("load", [_aws, _gcp], ids=["aws", "gcp"])
def test_gpu_workers_scale_from_zero_and_the_head_trains_nothing(load):
    config = load()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # The head advertises no logical CPU and no GPU: no Train worker, Ray Data task or scorer
    # actor can be placed there.
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if name != config["head_node_type"] and "GPU" in t["resources"]}
    assert len(gpu_types) >= 2
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, name
        assert t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 1, name
        assert t["max_workers"] <= config["max_workers"], name
    # At least one GPU type the autoscaler may actually launch.
    assert any(t["max_workers"] > 0 for t in gpu_types.values())
    for name, t in types.items():
        if name != config["head_node_type"]:
            assert t.get("min_workers", 0) == 0, f"{name} would run (and bill) while idle"


@pytest.mark.parametrize("load", [_aws, _gcp], ids=["aws", "gcp"])
def test_token_auth_is_on_and_the_dashboard_is_private(load):
    config = load()
    head_cmds = " ".join(config["head_start_ray_commands"])
    worker_cmds = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_cmds
    assert "RAY_AUTH_MODE=token ray start --address" in worker_cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds and "0.0.0.0" not in head_cmds
    # One token on every node: the laptop's, copied by file_mounts.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The same environment on every node: one image, torch before bioray.
    assert "image" in config["docker"] and "head_image" not in config["docker"]
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch" in c)
    bioray_at = next(i for i, c in enumerate(setup) if "bioray" in c and "pip install" in c)
    assert torch_at < bioray_at
    # No inbound rule beyond the ones Ray adds (intra-cluster and SSH).
    assert not config["provider"].get("security_group", {}).get("IpPermissions")


def _nodes(config: dict) -> dict:
    return {name: t["node_config"] for name, t in config["available_node_types"].items()}


def test_aws_volumes_are_encrypted_and_metadata_needs_a_session_token():
    for name, node in _nodes(_aws()).items():
        volumes = [m["Ebs"] for m in node["BlockDeviceMappings"]]
        assert volumes and all(v.get("Encrypted") is True for v in volumes), name
        # IMDSv2: a forged request from a container cannot read the instance role's credentials.
        assert node["MetadataOptions"]["HttpTokens"] == "required", name


def test_ssh_is_not_open_to_the_world():
    config = _aws()
    # A node that names no group gets Ray's default one, which opens 22 to 0.0.0.0/0.
    groups = {name: tuple(node.get("SecurityGroupIds") or ()) for name, node in _nodes(config).items()}
    assert all(groups.values()) and len(set(groups.values())) == 1, groups
    assert "security_group" not in config["provider"]
    assert "0.0.0.0/0" not in json.dumps(config)
    doc = (ROOT / "docs" / "cluster.md").read_text()
    assert "authorize-security-group-ingress" in doc and "--cidr 0.0.0.0/0" not in doc


def _policy(marker: str) -> dict:
    doc = (ROOT / "docs" / "cluster.md").read_text()
    block = doc.split(f"<!-- {marker} -->", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    return json.loads(block)


def test_workers_may_read_and_write_the_runs_bucket_and_nothing_else():
    config = _aws()
    head = config["head_node_type"]
    roles = {name: node["IamInstanceProfile"]["Name"] for name, node in _nodes(config).items()}
    assert roles.pop(head) == "bioray-head" and set(roles.values()) == {"bioray-worker"}
    worker = _policy("worker-policy")["Statement"]
    actions = {a for st in worker for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    assert actions == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    assert all(st["Resource"].startswith("arn:aws:s3:::YOUR-BUCKET") for st in worker)
    head_policy = _policy("head-policy")["Statement"]
    stopping = [st for st in head_policy if "ec2:TerminateInstances" in st["Action"]]
    assert stopping and all("ec2:ResourceTag/ray-cluster-name" in str(st.get("Condition")) for st in stopping)
    passing = [st for st in head_policy if "iam:PassRole" in st["Action"]]
    assert [st["Resource"] for st in passing] == ["arn:aws:iam::YOUR-ACCOUNT:role/bioray-worker"]
    assert not any(a in ("*", "s3:*", "ec2:*", "iam:*") for st in head_policy for a in st["Action"])


@pytest.mark.parametrize("load", [_aws, _gcp], ids=["aws", "gcp"])
def test_the_token_file_is_readable_by_its_owner_only(load):
    config = load()
    assert config["setup_commands"][0] == "chmod 600 ~/.ray/auth_token"


def test_gcp_workers_run_as_their_own_service_account():
    config = _gcp()
    head = config["head_node_type"]
    for name, node in _nodes(config).items():
        if name != head:
            assert [a["email"].split("@")[0] for a in node["serviceAccounts"]] == ["bioray-worker"], name


def test_working_dir_upload_stays_small(tmp_path):
    """What `ray job submit --working-dir .` uploads: .gitignore'd runs/ and virtualenvs stay home."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "pkg.zip"
    create_package(str(ROOT), target, include_gitignore=True, excludes=get_runtime_env_default_excludes())
    names = zipfile.ZipFile(target).namelist()
    for needed in ("jobs/finetune.py", "bioray/cli.py", "configs/quickstart.yaml", "pyproject.toml"):
        assert needed in names, needed
    for left_out in ("runs/", ".venv/", "venv/", ".git/", ".pytest_cache/"):
        assert not any(n.startswith(left_out) for n in names), left_out
    assert not any("__pycache__" in n for n in names)
    assert target.stat().st_size < 5 * 2**20, f"working dir package is {target.stat().st_size} bytes"


# ---------------------------------------------------------------------------------------------
# `ray job submit` end to end


def _get(url: str, token: str | None) -> int | None:
    """HTTP status of a GET (None: nothing listening yet); no proxies for 127.0.0.1."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.fixture
def local_cluster():
    """A private single-node Ray with token auth and the dashboard's job server, stopped after."""
    # Short base path: Ray's Unix socket paths under --temp-dir have a length limit.
    base = Path(tempfile.mkdtemp(prefix="brjob-", dir="/tmp"))
    token_file = base / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    gcs_port, dash_port, client_port, agent_port = free_ports(4)
    env = {
        **os.environ,
        # Token auth, explicitly: `ray start --head` turns it on by itself only when a token
        # already exists (~/.ray/auth_token), and the job CLI sends the token only in token mode.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        # The job's `python` is this interpreter (the driver inherits the raylet's PATH).
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    env.pop("RAY_ADDRESS", None)
    log = open(base / "ray-start.log", "w")
    head = subprocess.Popen(
        [ray_cli(), "start", "--head", "--block", "--num-cpus=2", f"--port={gcs_port}",
         f"--dashboard-port={dash_port}", "--include-dashboard=true", f"--ray-client-server-port={client_port}",
         f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={base / 'ray'}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while _get(f"{address}/api/jobs/", token) != 200:
            assert head.poll() is None, (base / "ray-start.log").read_text()[-3000:]
            assert time.time() < deadline, "job server did not come up in 120 s"
            time.sleep(1)
        yield {"address": address, "env": env, "base": base, "token": token, "gcs": f"127.0.0.1:{gcs_port}"}
    finally:
        stop_ray([head], base, [log])


@pytest.mark.e2e
def test_ray_job_submit_runs_finetune(local_cluster):
    address, env, base = local_cluster["address"], local_cluster["env"], local_cluster["base"]
    ray = ray_cli()
    # The job server refuses requests without the token.
    assert _get(f"{address}/api/jobs/", None) == 401
    assert _get(f"{address}/api/jobs/", "0" * 64) in (401, 403)
    # And so does the cluster itself: a driver without the token (none in the environment, no
    # ~/.ray/auth_token in its home) cannot join.
    home = base / "no-token-home"
    home.mkdir()
    client = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    refused = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={local_cluster['gcs']!r})"],
                             env={**client, "HOME": str(home)}, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "Authentication token is missing or incorrect" in refused.stdout + refused.stderr, refused.stderr[-2000:]

    run_dir = base / "run"  # absolute: the job's working dir is a copy, elsewhere
    job_id = f"bioray-e2e-{secrets.token_hex(4)}"
    runtime_env = {"env_vars": {"BIORAY_CACHE": str(base / "cache")}}
    submit = [
        ray, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "jobs/finetune.py", "--set", "train.max_steps=10", "--set", "train.checkpoint_every=0",
        "--set", "model.tiny.pretrain_steps=20", "--set", "eval.max_examples=8", "--set", f"run.dir={run_dir}",
    ]
    t0 = time.time()
    try:
        proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    except subprocess.TimeoutExpired:
        subprocess.run([ray, "job", "stop", "--address", address, job_id], env=env, capture_output=True, timeout=60)
        raise
    elapsed = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    status = subprocess.run([ray, "job", "status", "--address", address, job_id], env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and f"job '{job_id}' succeeded" in status.stdout.lower(), status.stdout
    # The same through the REST API the CLI wraps.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(f"{address}/api/jobs/{job_id}",
                                 headers={"Authorization": f"Bearer {local_cluster['token']}"})
    with opener.open(req, timeout=10) as r:
        assert json.loads(r.read())["status"] == "SUCCEEDED"
    logs = subprocess.run([ray, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=120)
    assert logs.returncode == 0
    assert "| source |" in logs.stdout, logs.stdout[-4000:]

    result = json.loads((run_dir / "result.json").read_text())
    assert result["train"]["steps"] == 10
    best = Path(result["best_checkpoint"])
    assert best.is_absolute() and (best / "adapter_model.safetensors").is_file()
    # The corpus landed in the run folder; the sample data in the job's own working-dir copy,
    # never in this checkout's runs/ (the job does not see this checkout at all).
    assert (run_dir / "corpus" / "manifest.json").is_file()
    print(f"ray job submit: {elapsed:.0f} s")
