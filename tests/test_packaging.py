"""dapt as a package: the sdist and the wheel hold every module and the packaged configs; configs are found by
name or path; ranks start as `python -m dapt <stage>`; and, installed from the wheel into a fresh venv (the
pinned torch reused, the checkout not importable), it runs from a directory outside the checkout: `dapt
--version`, MLM under `deepspeed $(which dapt)` and fine-tuning under `torchrun -m dapt` on 2 ranks, and the
Slurm scripts with no checkout (`-m install`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, assert_ok, free_port

from dapt import configs
from dapt.errors import DaptError
from dapt.jobs.pipeline import deepspeed_command

PACKAGE = ROOT / "dapt"


def package_files() -> set[str]:
    """What the wheel must hold under dapt/: every module, and the configs."""
    return {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
            and (p.suffix == ".py" or p.parent in (configs.DS.folder, configs.RECIPE.folder))}


@pytest.fixture(scope="session")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist (setup.py sdist), and the wheel built from it by pip (no network, no build isolation), from
    a copy of the sources: the checkout's own build/ may hold modules that no longer exist."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("setup.py", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    for name in ("dapt", "launch", "slurm"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    quiet = {"capture_output": True, "text": True, "timeout": 300}
    assert_ok(subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)], cwd=src, **quiet))
    (sdist,) = out.glob("dapt-*.tar.gz")
    assert_ok(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                              "--disable-pip-version-check", "-q", "-w", str(out), str(sdist)], **quiet))
    (wheel,) = out.glob("dapt-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_every_subpackage_is_a_regular_package():
    """find_packages skips a folder without __init__.py, and the wheel then lacks it (import fails installed)."""
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert [str(f.relative_to(ROOT)) for f in sorted(folders) if not (f / "__init__.py").is_file()] == []


def test_wheel_and_sdist_hold_every_module_and_config(dists):
    wanted = package_files()
    assert {"dapt/jobs/trainer.py", "dapt/configs/ds/zero2_fp16.json", "dapt/configs/recipes/demo.yaml"} <= wanted
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = whl.namelist()
        entry_points = whl.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {n for n in names if n.startswith("dapt/")} == wanted  # every module, and nothing stale
    assert "dapt = dapt.cli:main" in entry_points
    with tarfile.open(dists["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if m.isfile()}
    assert wanted <= members
    scripts = {p.relative_to(ROOT).as_posix() for p in [*(ROOT / "launch").glob("*.py"), *(ROOT / "slurm").glob("*.sh")]}
    assert scripts <= members and not any(m.startswith(("ds_configs/", "recipes/")) for m in members)
    print(f"wheel: {len(wanted)} files under dapt/ ({sum(n.endswith('.py') for n in wanted)} modules); "
          f"sdist: {len(members)} files")


def test_top_level_config_folders_are_the_packaged_ones():
    """ds_configs/ and recipes/ (the layout's names, the README's paths) are links to dapt/configs/: one copy.
    Where a checkout has them as plain folders (no symlinks), they must hold the same bytes."""
    for top, kind in (("ds_configs", configs.DS), ("recipes", configs.RECIPE)):
        link = ROOT / top
        if link.is_symlink():
            assert link.resolve() == kind.folder.resolve()
        else:
            ours = {p.name: p.read_bytes() for p in kind.folder.iterdir() if p.is_file()}
            assert {p.name: p.read_bytes() for p in link.iterdir() if p.is_file()} == ours


def test_configs_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: its ds_configs/ and recipes/ are not here
    zero2 = configs.DS.folder / "zero2_fp16.json"
    for value in ("zero2_fp16", "zero2_fp16.json", "ds_configs/zero2_fp16.json"):
        assert configs.find_ds_config(value) == zero2
    assert configs.find_recipe("imdb-bert-base") == configs.find_recipe("recipes/imdb-bert-base.yaml")
    (tmp_path / "zero2_fp16.json").write_text("{}")  # a path that exists wins over a packaged name
    assert configs.find_ds_config("zero2_fp16.json") == Path("zero2_fp16.json")
    assert configs.find_ds_config("zero2_fp16") == zero2
    with pytest.raises(DaptError) as err:
        configs.find_ds_config("zero9")
    assert str(err.value) == ("DeepSpeed config not found: zero9 (give a file, or one of the names: zero1_auto, "
                              "zero1_fp16, zero2_auto, zero2_bf16, zero2_fp16, zero3_auto, zero3_bf16, zero3_fp16, "
                              "zero3_offload_fp16)")
    for missing in ("/nowhere/zero2_fp16.json", "elsewhere/zero2_fp16.json"):  # paths are not names
        with pytest.raises(DaptError, match="DeepSpeed config not found"):
            configs.find_ds_config(missing)


def test_unknown_config_name_is_one_line_and_exit_2(tmp_path, base_env):
    proc = subprocess.run([sys.executable, "-m", "dapt", "mlm", "--config", "imdb", "--output_dir", "out"],
                          cwd=tmp_path, env=base_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if "error" in ln] == [
        "dapt: error: recipe not found: imdb (give a file, or one of the names: demo, imdb-bert-base)"]
    assert not (tmp_path / "out").exists()


def test_ranks_start_as_python_m_dapt():
    """The pipeline's (and the benchmarks') rank command names the module, never a file of the checkout."""
    cmd = deepspeed_command("mlm", 2)
    assert cmd[-3:] == ["--module", "dapt", "mlm"] and deepspeed_command("mlm.py", 2)[-3:] == cmd[-3:]
    assert not any(str(ROOT / "launch") in c or str(PACKAGE) in c for c in cmd), cmd


# --- installed from the wheel, run from outside the checkout -----------------------------------------------

@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed and this venv's packages (the pinned torch, DeepSpeed, ...)
    visible through a .pth line. Directories a .pth adds are not site directories, so the .pth files in
    them (the editable install's import hook for the checkout) are not run: dapt can only come from the wheel."""
    env_dir = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    assert_ok(subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                              "--disable-pip-version-check", "-q", str(dists["wheel"])],
                             capture_output=True, text=True, timeout=300))
    site_dir = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    ours = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}  # this venv's packages
    (site_dir / "reuse_dapt_test_env.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    # the launcher script a `pip install deepspeed` would have put here, running this venv's python
    (env_dir / "bin" / "deepspeed").write_text(f"#!{py}\nfrom deepspeed.launcher.runner import main\nmain()\n")
    (env_dir / "bin" / "deepspeed").chmod(0o755)
    return env_dir


@pytest.fixture
def outside_env(venv, base_env) -> dict[str, str]:
    """base_env without the checkout on PYTHONPATH, the venv first on PATH (the rest of PATH keeps ninja and
    the compiler for DeepSpeed's JIT ops)."""
    env = {k: v for k, v in base_env.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(venv)}


def run_outside(cmd: list, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.install
@pytest.mark.dist
def test_installed_wheel_runs_mlm_then_finetune_outside_the_checkout(venv, outside_env, tmp_path, tiny_model,
                                                                      demo_files):
    py, dapt_bin = venv / "bin" / "python", venv / "bin" / "dapt"
    start = time.perf_counter()
    # where dapt, a module the old wheel lacked (found, not run: that costs torch's import) and a config come from
    proc = run_outside([py, "-c", "import importlib.util, json, sys, dapt; from dapt.configs import find_ds_config\n"
                        "print(json.dumps([dapt.__file__, importlib.util.find_spec('dapt.jobs.trainer').origin, "
                        "str(find_ds_config('zero2_auto')), any('__editable__' in m for m in sys.modules)]))"],
                       tmp_path, outside_env)
    assert_ok(proc)
    init, trainer, ds, editable = json.loads(proc.stdout.splitlines()[-1])
    site = str(venv / "lib")
    assert init.startswith(site) and trainer.startswith(site) and ds.startswith(site) and not editable, proc.stdout
    version = run_outside([dapt_bin, "--version"], tmp_path, outside_env)
    assert_ok(version)
    assert version.stdout.startswith("dapt ")

    common = ["--ds_config", "zero2_auto", "--max_seq_length", 32, "--num_epochs", 1, "--max_samples", 48,
              "--effective_batch_size", 8, "--micro_batch_size", 4, "--validation_split", 0, "--save_steps", 0,
              "--logging_steps", 1, "--learning_rate", "1e-3", "--warmup", 0]
    # `deepspeed $(which dapt) mlm ...`: the venv's bin first on PATH
    mlm = run_outside(["deepspeed", "--num_gpus", 2, "--master_port", free_port(), shutil.which("dapt", path=outside_env[
        "PATH"]), "mlm", "--model_name_or_path", tiny_model, "--data_files", demo_files["unlabelled"],
        "--output_dir", "mlm", *common], tmp_path, outside_env)
    assert_ok(mlm)
    mlm_s = time.perf_counter() - start
    assert f"'{py}', '-u', '{dapt_bin}', '--local_rank=0', 'mlm'" in mlm.stdout + mlm.stderr  # the launcher's log
    ft = run_outside([py, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port(),
                      "-m", "dapt", "finetune", "--model_name_or_path", "mlm", "--data_files", demo_files["train"],
                      "--output_dir", "finetune", "--head_tokens", 8, *common], tmp_path, outside_env)
    assert_ok(ft)
    for proc in (mlm, ft):  # rank 0's line: both launchers' ranks met through the environment they were given
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("dapt: launcher ")]
        assert len(lines) == 1 and lines[0].startswith("dapt: launcher env: 2 ranks (gloo), master "), lines
    for stage in ("mlm", "finetune"):
        run_cfg = json.loads((tmp_path / stage / "run_config.json").read_text())
        assert run_cfg["world_size"] == 2 and run_cfg["config"]["ds_config"] == "zero2_auto"
        assert (tmp_path / stage / "model" / "model.safetensors").is_file()
    assert not (ROOT / "mlm").exists() and not (ROOT / "finetune").exists()
    print(f"installed wheel, outside the checkout: checks + MLM (deepspeed) {mlm_s:.0f}s, "
          f"fine-tune (torchrun) {time.perf_counter() - start - mlm_s:.0f}s")


@pytest.mark.install
def test_installed_wheel_runs_the_slurm_scripts_without_a_checkout(venv, outside_env, tmp_path):
    """A copy of slurm/ alone (no checkout beside it): the task runs `<venv python> -m dapt mlm` with the
    recipe and DeepSpeed config found by name in the installed package (srun and scontrol are stand-ins)."""
    scripts, stubs = tmp_path / "scripts", tmp_path / "stubs"
    shutil.copytree(ROOT / "slurm", scripts / "slurm")
    stubs.mkdir()
    (stubs / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/argv; env > {tmp_path}/task_env\n')
    (stubs / "scontrol").write_text(f'#!/bin/bash\necho "   Command={scripts}/slurm/mlm.sh --output_dir x"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    py = venv / "bin" / "python"
    env = {k: v for k, v in outside_env.items() if not k.startswith(("SLURM_", "SBATCH_", "DAPT_"))}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1",
               DAPT_PYTHON=str(py), DAPT_VENV="none", DAPT_DS_CONFIG="zero2_bf16")
    proc = run_outside(["bash", scripts / "slurm" / "mlm.sh", "--output_dir", "x"], tmp_path, env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    packaged = Path(subprocess.run([str(py), "-c", "import dapt.configs as c; print(c.HERE)"], env=env,
                                   cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip())
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[argv.index(str(py)):] == [str(py), "-m", "dapt", "mlm", "--config",
                                          str(packaged / "recipes" / "imdb-bert-base.yaml"), "--ds_config",
                                          str(packaged / "ds" / "zero2_bf16.json"), "--output_dir", "runs/mlm",
                                          "--output_dir", "x"]
    task_env = dict(line.split("=", 1) for line in (tmp_path / "task_env").read_text().splitlines() if "=" in line)
    assert str(venv) in str(packaged) and "PYTHONPATH" not in task_env  # no checkout to put first
