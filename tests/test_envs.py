"""Software environments and rule hygiene: conda envs agree with requirements*.txt, every rule
logs, benchmarks and names an env, GPU rules claim the GPU, and `snakemake --lint` is clean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))
RULE_FILES = sorted((REPO / "rules").glob("*.smk"))
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)$")
# Rules that must hold the GPU whatever the heuristic below says.
GPU_RULES = {"quantize", "quantize_for_training", "quantization_report"}
# Torch-env rules whose work is a few small SVDs on one core: no accelerator, no model threads.
CPU_TORCH_RULES = {"compress_adapter"}
# Training rules ask for one GPU and MODEL_THREADS per process of train.distributed (of the
# row of the trainings table the job trains: rules/common.smk).
TRAINING_RULES = ("train_qlora", "recover")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins() -> dict[str, str]:
    pins = {}
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (REPO / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            match = PIN.match(line)
            assert match, f"{name}: '{line}' is not an exact pin (expected name==version)"
            pins[normalize(match[1])] = match[2]
    return pins


def env_entries(path: Path) -> tuple[list[str], list[str]]:
    """(conda dependencies, pip requirements) of one environment file."""
    env = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip.extend(dep.get("pip", []))
        else:
            conda.append(str(dep))
    return conda, pip


def test_env_files_exist():
    assert ENV_FILES, "no envs/*.yaml"
    assert RULE_FILES, "no rules/*.smk"


@pytest.mark.parametrize("env", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_exact_versions(env):
    conda, pip = env_entries(env)
    assert pip, f"{env.name}: no pip: list"
    for req in pip:
        assert PIN.match(req), f"{env.name}: pip entry '{req}' is not an exact name==version pin"
    for dep in conda:
        if dep == "pip":  # the installer itself; its version does not affect the result
            continue
        assert re.fullmatch(r"[A-Za-z0-9_.-]+=[0-9][A-Za-z0-9.]*", dep), \
            f"{env.name}: conda dependency '{dep}' is not pinned to one version (name=version)"


@pytest.mark.parametrize("env", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_match_requirements(env):
    pins = requirement_pins()
    _, pip = env_entries(env)
    for req in pip:
        name, version = PIN.match(req).groups()
        assert normalize(name) in pins, \
            f"{env.name}: '{name}' is not pinned in requirements.txt or requirements-nodeps.txt"
        assert pins[normalize(name)] == version, \
            f"{env.name}: {name}=={version}, but the requirements pin {pins[normalize(name)]}"


# ---- rules ----------------------------------------------------------------------------------

def parse_rules() -> dict[str, dict]:
    """Rule name -> {file, text, directives: {name: body}} from a plain reading of rules/*.smk."""
    rules = {}
    header = re.compile(r"^(?:rule|checkpoint)\s+(\w+)\s*:\s*$", re.MULTILINE)
    for path in RULE_FILES:
        text = path.read_text()
        starts = list(header.finditer(text))
        for i, match in enumerate(starts):
            end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
            body = text[match.end():end]
            # The block ends at the first non-blank line that is not indented.
            block = re.split(r"\n(?=\S)", body, maxsplit=1)[0]
            directives, current = {}, None
            for line in block.splitlines():
                found = re.match(r"^    (\w+):\s*(.*)$", line)
                if found:
                    current = found[1]
                    directives[current] = found[2]
                elif current and line.strip():
                    directives[current] += "\n" + line.strip()
            assert match[1] not in rules, f"rule {match[1]} defined twice"
            rules[match[1]] = {"file": path, "directives": directives}
    return rules


RULES = parse_rules()


def string_value(body: str) -> str:
    found = re.search(r"""["']([^"']+)["']""", body)
    assert found, f"no path in {body!r}"
    return found[1]


def test_rules_found():
    assert {"fetch_dataset", "tokenize", "import_base_model", "quantize",
            "quantization_report"} <= set(RULES)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_logs_benchmarks_and_names_an_env(rule):
    info = RULES[rule]
    directives = info["directives"]
    for key in ("log", "benchmark", "conda"):
        assert key in directives and directives[key].strip(), \
            f"rule {rule} ({info['file'].name}) has no {key}: directive"
    env = (info["file"].parent / string_value(directives["conda"])).resolve()
    assert env.parent == REPO / "envs" and env.is_file(), \
        f"rule {rule}: conda env {env} is not a file in envs/"


def test_gpu_rules_claim_the_gpu():
    """Every rule in the torch environment but the import (CPU-only dequantization) uses the
    accelerator when there is one, so it must hold `gpu=1` for Snakemake to serialize it."""
    assert GPU_RULES <= set(RULES)
    for rule, info in sorted(RULES.items()):
        env = string_value(info["directives"]["conda"])
        if rule in {"import_base_model", *CPU_TORCH_RULES} or not env.endswith("torch.yaml"):
            continue
        resources = info["directives"].get("resources", "")
        if rule in TRAINING_RULES:
            assert "gpu=training_gpus," in resources, rule
            assert "nodes=training_nodes," in resources, rule
            continue
        assert re.search(r"\bgpu\s*=\s*1\b", resources), \
            f"rule {rule} runs torch work on the accelerator but does not declare resources: gpu=1"
    for rule in GPU_RULES:
        assert string_value(RULES[rule]["directives"]["conda"]).endswith("torch.yaml")


def test_import_base_model_is_not_a_gpu_rule():
    """Import dequantizes on the CPU; holding the GPU would serialize it against training."""
    assert "gpu" not in RULES["import_base_model"]["directives"].get("resources", "")


def test_every_rule_declares_its_threads():
    """Snakemake gives a job `threads` cores (1 if undeclared) and sets OMP_NUM_THREADS to
    it: model rules (the torch env) take MODEL_THREADS, the others DATA_THREADS."""
    for rule, info in sorted(RULES.items()):
        threads = info["directives"].get("threads", "").strip()
        torch_env = string_value(info["directives"]["conda"]).endswith("torch.yaml")
        model = (torch_env and rule not in CPU_TORCH_RULES) or rule.startswith("evaluate")
        expected = "MODEL_THREADS" if model else "DATA_THREADS"
        if rule in TRAINING_RULES:
            expected = "training_threads"
        assert threads == expected, f"rule {rule}: threads {threads!r}, expected {expected}"


def test_slurm_cpus_per_task_are_the_rules_threads():
    """Under the Slurm profile a job's --cpus-per-task is its threads: every model rule gets
    its threads from set-threads, and no cpus_per_task resource can part the two."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    model_rules = {r for r, i in RULES.items() if "MODEL_THREADS" in i["directives"]["threads"]}
    model_rules |= set(TRAINING_RULES)
    assert set(profile["set-threads"]) == model_rules
    assert all(isinstance(n, int) and n >= 1 for n in profile["set-threads"].values())
    resources = [profile["default-resources"], *profile["set-resources"].values()]
    assert not any("cpus_per_task" in r or "cpus_per_gpu" in r for r in resources)


def test_model_threads_are_every_core_or_a_share_per_gpu(tmp_path):
    """What `threads: MODEL_THREADS` becomes, from Snakemake's own dry run of a rule."""
    common = (REPO / "rules" / "common.smk").read_text()
    start = common.index("def _gpus")
    end = common.index("DATA_THREADS = 1")
    (tmp_path / "Snakefile").write_text(
        "from snakemake.exceptions import WorkflowError\n" + common[start:end] + (
        "rule a:\n    output: 'a'\n    threads: MODEL_THREADS\n    shell: 'touch {output}'\n"))

    def threads(*args):
        out = subprocess.run([sys.executable, "-m", "snakemake", "-n", *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        found = re.search(r"threads: (\d+)", out.stdout)
        return int(found[1]) if found else 1  # a dry run omits "threads: 1"

    assert threads("--cores", "4") == 4
    assert threads("--cores", "4", "--resources", "gpu=1") == 4
    assert threads("--cores", "4", "--resources", "gpu=2") == 2
    assert threads("--cores", "1", "--resources", "gpu=2") == 1
    # A cluster executor may run without --cores: 1, unless the profile's set-threads says
    assert threads("--executor", "slurm", "--jobs", "5") == 1


def test_snakemake_lint_is_clean():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Lints for" not in output, output


@pytest.mark.parametrize("env", ENV_FILES, ids=lambda p: p.name)
def test_each_env_installs_the_library(env):
    """Under --use-conda each env gets the library installed editable (a post-deploy script,
    run by Snakemake once per env), so that jobs run this repository's code."""
    script = env.with_name(env.stem + ".post-deploy.sh")
    assert script.is_file() and script.stat().st_mode & 0o111, f"{script.name} missing"
    text = script.read_text()
    assert "pip install --no-deps --editable \"${QLORA_PIPELINE_ROOT" in text
    assert 'os.environ.setdefault("QLORA_PIPELINE_ROOT", workflow.basedir)' in (
        REPO / "rules/common.smk").read_text()
