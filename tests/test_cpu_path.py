"""The CPU path: `--dtype auto` (decision from injected probe figures and units), the job's dtype on resume, worker
threads, the PLoRA row-run path, and bf16 against fp32 on the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from ixc_engine.api import RewardEngine, resolve_device_dtype
from ixc_engine.cli import main
from ixc_engine.engine import cpu
from ixc_engine.engine.cpu import CpuDtypeChoice, auto_cpu_dtype, bf16_units, choose_cpu_dtype


# --- the decision --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("units", "fp32", "bf16", "hidden", "want"), [
    ((), 50.0, 300.0, 4096, torch.float32),  # no units: never bf16, whatever a probe would say
    (("amx_bf16",), 90.0, 300.0, 4096, torch.bfloat16),
    (("avx512_bf16",), 90.0, 120.0, 4096, torch.bfloat16),  # 1.33x
    (("amx_bf16", "avx512_bf16"), 90.0, 110.0, 4096, torch.float32),  # 1.22x: not worth 3 digits of every score
    (("amx_bf16",), 90.0, 20.0, 1024, torch.float32),
    (("amx_bf16",), 90.0, 300.0, 64, torch.float32),  # tiny model: no probe, fp32
    (("amx_bf16",), None, None, 4096, torch.float32),  # not probed
])
def test_choose_cpu_dtype(units, fp32, bf16, hidden, want):
    got = choose_cpu_dtype(units, fp32, bf16, hidden_size=hidden)
    assert got.dtype == want, got.reason
    assert got.reason


def test_auto_cpu_dtype_follows_the_probe():
    calls = []

    def probe(figures):
        def run(dtype, width):
            calls.append((dtype, width))
            return figures[dtype]
        return run

    fast = {torch.float32: 90.0, torch.bfloat16: 300.0}
    got = auto_cpu_dtype(4096, units=("amx_bf16",), probe=probe(fast))
    assert got.dtype == torch.bfloat16 and got.bf16_gflops == 300.0 and got.fp32_gflops == 90.0
    assert {w for _, w in calls} == {1024}  # the model's width, capped so the probe stays < 1 s
    assert [d for d, _ in calls] == [torch.float32, torch.bfloat16] * 2  # interleaved rounds
    calls.clear()
    slow = {torch.float32: 90.0, torch.bfloat16: 11.0}
    assert auto_cpu_dtype(512, units=("avx512_bf16",), probe=probe(slow)).dtype == torch.float32
    assert [w for _, w in calls] == [512, 512]  # bf16 lost the first round: no second one

    def never(dtype, width):
        raise AssertionError("no probe without bf16 units or for a tiny model")

    assert auto_cpu_dtype(4096, units=(), probe=never).dtype == torch.float32
    assert auto_cpu_dtype(64, units=("amx_bf16",), probe=never).dtype == torch.float32


def test_bf16_units_from_capabilities_or_flags():
    assert bf16_units({"amx_bf16": True, "avx512_bf16": False, "avx2": True}) == ("amx_bf16",)
    assert bf16_units(flags={"avx2", "avx512_bf16", "amx_bf16", "amx_tile"}) == ("amx_bf16", "avx512_bf16")
    assert bf16_units(flags={"avx2", "fma"}) == ()
    assert set(bf16_units()) <= set(cpu.BF16_UNITS)  # this machine's, whatever it has


def test_real_probe_is_quick_and_sane():
    import time

    t0 = time.perf_counter()
    rate = cpu.probe_linear(torch.float32, 256)
    assert rate > 0.1  # GFLOP/s
    assert time.perf_counter() - t0 < 5


def test_resolve_auto_on_cpu(monkeypatch):
    seen = []

    def fake(hidden_size=None):
        seen.append(hidden_size)
        return CpuDtypeChoice(torch.bfloat16, "injected")

    monkeypatch.setattr(cpu, "auto_cpu_dtype", fake)
    assert resolve_device_dtype("cpu", "auto", 2048) == (torch.device("cpu"), torch.bfloat16)
    assert seen == [2048]
    assert resolve_device_dtype("cpu", None) == (torch.device("cpu"), torch.float32)  # the API default stays fp32
    with pytest.raises(ValueError, match="auto"):
        resolve_device_dtype("cpu", "fp8")


def test_from_pretrained_auto_probes_at_the_model_width(tiny_ckpt, monkeypatch):
    seen = []

    def fake(hidden_size=None):
        seen.append(hidden_size)
        return CpuDtypeChoice(torch.bfloat16, "injected")

    monkeypatch.setattr(cpu, "auto_cpu_dtype", fake)
    eng = RewardEngine.from_pretrained(tiny_ckpt, device="cpu", dtype="auto")
    assert seen == [64] and eng.engine.runner.dtype == torch.bfloat16
    assert eng.dtype_choice.reason == "injected"
    assert next(eng.engine.runner.model.parameters()).dtype == torch.bfloat16


# --- the job file ----------------------------------------------------------------------------------------------------
@pytest.fixture
def small_corpus(tmp_path):
    lines = [json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": "Yes. " * (i + 1)}]})
             for i in range(5)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _unfinish(out, keep: int) -> None:
    """Make a finished job look interrupted after `keep` lines."""
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:keep]))
    job = out.with_name(out.name.removesuffix(".jsonl") + ".job.json")
    d = json.loads(job.read_text())
    d["complete"] = False
    job.write_text(json.dumps(d))
    return d


def test_auto_records_its_choice_and_resume_keeps_the_jobs_dtype(small_corpus, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    job = tmp_path / "s.job.json"
    assert main(["score", str(small_corpus), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress"]) == 0
    assert json.loads(job.read_text())["dtype"] == "float32"  # auto on a hidden-64 model: fp32, recorded
    assert "auto: model hidden size 64" in capsys.readouterr().err

    assert main(["score", str(small_corpus), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress",
                 "--dtype", "bfloat16", "--restart"]) == 0
    assert _unfinish(out, 2)["dtype"] == "bfloat16"
    # another explicit dtype is refused, and nothing is written
    before = out.read_text()
    assert main(["score", str(small_corpus), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress",
                 "--dtype", "float32"]) == 2
    assert "was scored in bfloat16" in capsys.readouterr().err
    assert out.read_text() == before
    # auto resumes in the job's dtype, not in what a new probe would pick (fp32 for this model)
    assert main(["score", str(small_corpus), "--model", str(tiny_ckpt), "-o", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resuming: 2 of 5" in err and "bfloat16" in err
    d = json.loads(job.read_text())
    assert d["dtype"] == "bfloat16" and d["complete"] and len(out.read_text().splitlines()) == 5


# --- threads -----------------------------------------------------------------------------------------------------
def test_worker_defaults():
    assert cpu.default_workers("cpu", cores=2) == 0
    assert cpu.default_workers("cpu", cores=64) == 0
    assert cpu.worker_threads(2, cores=2) == 1
    assert cpu.worker_threads(3, cores=16) == 4
    assert cpu.worker_threads(0, cores=8) == 8


def test_cli_workers_help_says_when_to_raise_it(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--workers" in text and "Raise it on a GPU machine" in text and "On a CPU device raise it" in text


# --- the PLoRA row-run path ----------------------------------------------------------------------------------------
def test_row_ranges():
    from ixc_engine.models.internlm2 import _row_ranges

    assert _row_ranges(torch.tensor([3])) == [(3, 4)]
    assert _row_ranges(torch.tensor([0, 1, 2, 7, 8, 10])) == [(0, 3), (7, 9), (10, 11)]
    assert _row_ranges(torch.tensor([2, 1])) is None  # not sorted
    assert _row_ranges(torch.tensor([1, 1, 2])) is None  # repeated
    assert _row_ranges(torch.arange(0, 200, 2)) is None  # too many runs: the gather/scatter path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", [[0, 1, 2, 7, 8, 9, 10, 30], [5], list(range(0, 140, 2))])
def test_plora_runs_equal_the_gather_scatter_path(dtype, index):
    from ixc_engine.models.internlm2 import PLoRALinear

    torch.manual_seed(0)
    lin = PLoRALinear(48, 80, 8, 0.5).to(dtype)
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(140, 48).to(dtype)
    idx = torch.tensor(index)
    with torch.inference_mode():
        got = lin(x, idx)
    want = lin(x, idx)  # grad mode: the index_select / index_add path, as in training
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol)
    mask = torch.zeros(140, dtype=torch.bool)
    mask[idx] = True
    plain = torch.nn.functional.linear(x, lin.weight).detach()
    assert torch.equal(got[~mask], plain[~mask])  # text rows untouched
