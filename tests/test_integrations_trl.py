"""The TRL adapter `IXCReward`, called the way TRL's GRPOTrainer calls reward functions.

`trl` is not a dev dependency (it pulls transformers, datasets and accelerate), so `call_like_grpo` imitates TRL's
`GRPOTrainer._calculate_rewards` (trl 1.16): every dataset column except prompt/completion/completion_ids is passed as
a list, plus trainer_state, log_extra and log_metric, and the call is ``reward_func(prompts=..., completions=...,
completion_ids=..., **reward_kwargs)``. For vision-language policies TRL rewrites the prompts with
``prepare_multimodal_messages``, which `tl_prepare_multimodal` imitates. When trl is installed, the last test runs
TRL's own `_calculate_rewards` and `prepare_multimodal_messages` on the adapter as well.
"""

from __future__ import annotations

import types

import pytest
import torch
from PIL import Image

from ixc_engine.api import RewardEngine
from ixc_engine.integrations.trl import IXCReward
from ixc_engine.serve.chat import render_chat
from tests.serve_support import DEMO

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(demo_ref):
    return demo_ref


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (90 + 10 * i, 70), ((50 * i) % 256, 120, 200 - 30 * i)) for i in range(4)]


def call_like_grpo(reward_func, inputs: list[dict], prompts, completions):
    keys = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
    reward_kwargs = {k: [ex[k] for ex in inputs] for k in keys}
    reward_kwargs["trainer_state"] = types.SimpleNamespace(global_step=3)
    reward_kwargs["log_extra"] = lambda *a, **k: None
    reward_kwargs["log_metric"] = lambda *a, **k: None
    completion_ids = [[1, 2, 3] for _ in completions]
    return reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids, **reward_kwargs)


def tl_prepare_multimodal(messages: list[dict], images: list) -> list[dict]:
    """TRL's prepare_multimodal_messages for string contents: images as parts before the first user text."""
    out, placed = [], False
    for m in messages:
        parts = [{"type": "text", "text": m["content"]}]
        if m["role"] == "user" and not placed:
            parts = [{"type": "image", "image": im} for im in images] + parts
            placed = True
        out.append({"role": m["role"], "content": parts})
    return out


G = 2  # generations per prompt, as GRPO repeats each row


def test_plain_prompts(engine):
    rows = [{"prompt": "What is two plus two?", "answer": "4"}, {"prompt": "Name a colour.", "answer": "red"}]
    inputs = [r for r in rows for _ in range(G)]
    prompts = [r["prompt"] for r in inputs]
    completions = ["Four.", "5", "Blue.", "A dog."]
    got = call_like_grpo(IXCReward(engine), inputs, prompts, completions)
    want = engine.score([[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                         for p, c in zip(prompts, completions)])
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    # a prompt that already holds the chat template is parsed, not wrapped a second time
    templ = [render_chat([{"role": "user", "content": p}]) + "<|im_start|>assistant\n" for p in prompts]
    assert call_like_grpo(IXCReward(engine), inputs, templ, completions) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_conversational_prompts_with_image_column(engine, images):
    rows = [{"prompt": [{"role": "user", "content": "Describe the picture."}], "image": images[0]},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"}],
             "image": images[1]}]
    inputs = [r for r in rows for _ in range(G)]
    prompts = [r["prompt"] for r in inputs]
    completions = [[{"role": "assistant", "content": c}] for c in ("A box.", "Nothing.", "Blue.", "Red.")]
    got = call_like_grpo(IXCReward(engine), inputs, prompts, completions)
    want = engine.score([p + c for p, c in zip(prompts, completions)], images=[[r["image"]] for r in inputs])
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    # text-only conversational rows
    plain = [{"prompt": r["prompt"]} for r in inputs]
    want_txt = engine.score([p + c for p, c in zip(prompts, completions)])
    assert call_like_grpo(IXCReward(engine), plain, prompts, completions) == pytest.approx(want_txt, rel=1e-5, abs=1e-5)


def test_vlm_prompts_carry_the_images_once(engine, images):
    """TRL puts the `images` column into the prompt as image parts and still passes the column: count it once."""
    rows = [{"prompt": [{"role": "user", "content": "Compare them."}], "images": images[:2]},
            {"prompt": [{"role": "user", "content": "What is it?"}], "images": [images[2]]}]
    inputs = [r for r in rows for _ in range(G)]
    prompts = [tl_prepare_multimodal(r["prompt"], r["images"]) for r in inputs]
    completions = [[{"role": "assistant", "content": c}] for c in ("Same.", "Different.", "A box.", "A cat.")]
    got = call_like_grpo(IXCReward(engine), inputs, prompts, completions)
    convs = [[{"role": "user", "content": "<ImageHere>" * len(r["images"]) + r["prompt"][0]["content"]},
              c[0]] for r, c in zip(inputs, completions)]
    want = engine.score(convs, images=[r["images"] for r in inputs])
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_errors_raise_or_give_none(engine):
    inputs = [{"prompt": [{"role": "user", "content": "Hi"}]}, {"prompt": [{"role": "robot", "content": "Hi"}]}]
    prompts = [r["prompt"] for r in inputs]
    completions = [[{"role": "assistant", "content": "Hello."}]] * 2
    with pytest.raises(ValueError, match="sample 1: .*robot"):
        call_like_grpo(IXCReward(engine), inputs, prompts, completions)
    with pytest.warns(UserWarning, match="sample 1"):
        got = call_like_grpo(IXCReward(engine, on_error="none"), inputs, prompts, completions)
    assert got[1] is None
    assert got[0] == pytest.approx(engine.score([prompts[0] + completions[0]])[0], rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        IXCReward(engine)(prompts=prompts, completions=completions[:1])


def test_url_backend_equals_in_process(engine, images):
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    pytest.importorskip("prometheus_client")
    from ixc_engine.serve.app import ServeConfig, create_app
    from tests.serve_support import ServerThread

    served = RewardEngine.from_pretrained(DEMO, device="cpu")
    rows = [{"prompt": [{"role": "user", "content": "Describe the picture."}], "image": images[3]}]
    inputs = rows * G
    prompts = [r["prompt"] for r in inputs]
    completions = [[{"role": "assistant", "content": c}] for c in ("A box.", "A tree.")]
    want = call_like_grpo(IXCReward(engine), inputs, prompts, completions)
    with ServerThread(create_app(served, ServeConfig(api_key="k"))) as srv:
        fn = IXCReward(srv.url, api_key="k", retries=2)
        assert fn.__name__ == "ixc_reward"
        assert call_like_grpo(fn, inputs, prompts, completions) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_real_trl_calculate_rewards(engine, images):
    """TRL's own reward call and multimodal prompt preparation, when trl is installed (pip install -e '.[trl]')."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from trl.data_utils import prepare_multimodal_messages

    fn = IXCReward(engine)
    fake = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=types.SimpleNamespace(report_to=[]), state=types.SimpleNamespace(global_step=0),
        reward_funcs=[fn], reward_processing_classes=[None], reward_func_names=[fn.__name__],
        _log_completion_extra=lambda *a, **k: None, _log_metric=lambda *a, **k: None, environments=None,
    )
    rows = [{"prompt": [{"role": "user", "content": "What is it?"}], "images": [images[0]]},
            {"prompt": [{"role": "user", "content": "Colour?"}], "images": [images[1]]}]
    inputs = [r for r in rows for _ in range(G)]
    prompts = [prepare_multimodal_messages(r["prompt"], images=r["images"]) for r in inputs]
    completions = [[{"role": "assistant", "content": c}] for c in ("A box.", "Nothing.", "Blue.", "Red.")]
    got = grpo.GRPOTrainer._calculate_rewards(fake, inputs, prompts, completions, [[1]] * 4)
    want = engine.score([[{"role": "user", "content": "<ImageHere>" + r["prompt"][0]["content"]}, c[0]]
                         for r, c in zip(inputs, completions)], images=[r["images"] for r in inputs])
    assert got.shape == (4, 1)
    assert got[:, 0].tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)
