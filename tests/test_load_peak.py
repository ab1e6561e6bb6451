"""Loading allocates the weights in their final dtype: the peak of live model memory on the target device stays at
the final size (plus at most one tensor's host-side cast), instead of an fp32 copy of the whole model first."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ixc_engine import checkpoint


class _PeakOfModelBytes(TorchDispatchMode):
    """After every aten op: bytes of the distinct storages reachable from the model's parameters and buffers, plus
    the op's floating outputs, on `device`; keeps the maximum. (A temporary that outlives its op without being part of
    the model is not seen; loading makes none on the device.)"""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.models: list[torch.nn.Module] = []
        self.peak = 0

    def _bytes(self, tensors) -> int:
        seen, total = set(), 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device == self.device and t.is_floating_point():
                st = t.untyped_storage()
                key = st.data_ptr() or id(st)
                if key not in seen:
                    seen.add(key)
                    total += st.nbytes()
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        model_tensors = [t for m in self.models for t in (*m.parameters(), *m.buffers())]
        self.peak = max(self.peak, self._bytes(model_tensors + list(outs)))
        return out


def _load_peak(monkeypatch, ckpt, dtype):
    mode = _PeakOfModelBytes("cpu")
    real = checkpoint.meta_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        mode.models.append(model)
        return model

    real_iter = checkpoint.iter_tensors

    def read_outside_the_mode(files):
        # Reading a shard makes host tensors; with the CPU standing in for the device they must not be counted.
        it = real_iter(files)
        while True:
            with _disable_current_modes():
                item = next(it, None)
            if item is None:
                return
            yield item

    monkeypatch.setattr(checkpoint, "meta_model", build)
    monkeypatch.setattr(checkpoint, "iter_tensors", read_outside_the_mode)
    with mode:
        model, _ = checkpoint.load_model(ckpt, dtype=dtype, device="cpu")
    assert mode.models, "load_model did not build its model through checkpoint.meta_model: nothing was measured"
    final = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return mode.peak, final, largest, model


def test_bf16_load_peaks_at_its_final_size(monkeypatch, tiny_ckpt):
    peak, final, largest, model = _load_peak(monkeypatch, tiny_ckpt, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # tiny_ckpt is stored in fp32: each tensor's cast to bf16 is one host temporary at a time (counted here, as the
    # CPU stands in for the device)
    # (the old to_empty(device).to(dtype) peaked at 36.2 MB here: fp32 weights, then their casts)
    assert final <= peak <= final + largest, (peak, final, largest)


def test_peak_accounting_sees_an_fp32_materialisation(monkeypatch, tiny_ckpt):
    """The accounting would catch the old `to_empty(device).to(dtype)`: it peaks at the fp32 size."""
    mode = _PeakOfModelBytes("cpu")
    with torch.device("meta"):
        model = checkpoint.IXCRewardModel(*_cfg_and_rank(tiny_ckpt))
    mode.models.append(model)
    with mode:
        model = model.to_empty(device="cpu").to(torch.bfloat16)
    final = sum(p.numel() * p.element_size() for p in model.parameters())
    assert mode.peak >= 1.9 * final


def test_loaded_weights_equal_the_checkpoint(tiny_ckpt):
    model32, _ = checkpoint.load_model(tiny_ckpt, dtype=torch.float32)
    model16, _ = checkpoint.load_model(tiny_ckpt, dtype=torch.bfloat16)
    p16 = dict(model16.named_parameters())
    for name, p in model32.named_parameters():
        assert torch.equal(p16[name], p.to(torch.bfloat16)), name


def _cfg_and_rank(ckpt):
    from ixc_engine.config import ModelConfig

    cfg = ModelConfig.from_file(ckpt / "config.json")
    files = checkpoint.weight_files(ckpt)
    return cfg, checkpoint.plora_rank(files, cfg)
