"""powerbert.CudaGraphForward: a patched model captured in a CUDA graph (powerbert/cuda_graph.py).

Capture and replay need CUDA and the compiled kernels: those tests are marked ``gpu`` and skip
without CUDA, and skip under the interpreter (run them with POWERBERT_TEST_GPU=1, as
``gpu.sh tests`` does). On CPU the argument checks run, and so does what capture needs of the
model: a static-layout forward that reads no device value on the host.
"""
import contextlib
import traceback

import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

import powerbert
from conftest import interpreting
from powerbert.cuda_graph import CudaGraphForward
from tiny_bert import batch, build

WIDE = dict(hidden_size=64, num_attention_heads=2, intermediate_size=96)  # head dim 32: the Triton attention
FIXED, SHARES = (9, 6, 3), (0.7, 0.5, 0.2)
compiled_kernels = pytest.mark.skipif(interpreting(), reason="CUDA graphs need the compiled kernels: run with "
                                      "POWERBERT_TEST_GPU=1 (TRITON_INTERPRET is set)")


def _inputs(seed, device="cpu"):
    return {name: t.to(device) for name, t in batch(sizes=(13, 9, 4, 1), seed=seed).items()}


# ----------------------------------------------------------------------------- CPU: what capture needs


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
# Host arithmetic on Python ints (a full-length row's keep counts): no device value is read.
HOST_ONLY = ("keep_counts",)


@contextlib.contextmanager
def _host_reads():
    calls = []
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def tracked(name, method):
        def call(self, *args, **kwargs):
            frames = traceback.extract_stack()[:-1]
            if not any(frame.name in HOST_ONLY for frame in frames):
                calls.append(f"Tensor.{name} at " + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}"
                                                                  for f in reversed(frames[-4:])))
            return method(self, *args, **kwargs)
        return call

    for name, method in saved.items():
        setattr(torch.Tensor, name, tracked(name, method))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("retention", [FIXED, SHARES], ids=["fixed", "proportional"])
@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_static_forward_reads_nothing_on_the_host(cls, retention, monkeypatch, one_thread):
    """A host read of a device value (``.item()``, ``if tensor``, ...) breaks CUDA graph capture.
    transformers skips its own mask check while a stream captures: pretend one does."""
    import transformers.utils.import_utils as hf_imports

    monkeypatch.setattr(hf_imports, "is_cuda_stream_capturing", lambda: True)
    model = powerbert.patch(build(cls, **WIDE), retention, static_shapes=True)
    inputs = _inputs(1)
    with torch.no_grad():
        model(**inputs)
        with _host_reads() as calls:
            model(**inputs)
    assert calls == []


def test_argument_checks_run_before_anything_touches_cuda():
    model = powerbert.patch(build(BertModel, **WIDE), FIXED)
    inputs = _inputs(1)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        CudaGraphForward(model, **inputs)
    with pytest.raises(ValueError, match="example inputs"):
        CudaGraphForward(model)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        CudaGraphForward(model, warmup=0, **inputs)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        CudaGraphForward(model, input_ids=[[1, 2]])
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        CudaGraphForward(model, **inputs)


# ----------------------------------------------------------------------------- GPU: capture and replay


@pytest.mark.parametrize("retention", [FIXED, SHARES, None], ids=["fixed", "proportional", "stock"])
@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.gpu
@compiled_kernels
def test_replay_equals_the_eager_static_forward(cls, retention, dtype):
    model = build(cls, **WIDE).to("cuda", dtype)
    if retention is not None:
        powerbert.patch(model, retention, static_shapes=True)
    graph = CudaGraphForward(model, **_inputs(1, "cuda"))
    for seed in (2, 3):  # other batches of the captured shape: the replay follows its inputs
        inputs = _inputs(seed, "cuda")
        with torch.no_grad():
            eager = model(**inputs)
        replayed = graph(**inputs)
        key = "logits" if cls is BertForSequenceClassification else "last_hidden_state"
        torch.testing.assert_close(replayed[key], eager[key], atol=0, rtol=0)
        if retention is not None and cls is BertModel:
            assert torch.equal(replayed["kept_mask"], eager["kept_mask"])


@pytest.mark.gpu
@compiled_kernels
def test_capture_keeps_the_patch_setting_and_checks_replay_inputs():
    model = powerbert.patch(build(BertForSequenceClassification, **WIDE).to("cuda"), FIXED)  # static_shapes None
    graph = CudaGraphForward(model, **_inputs(1, "cuda"))
    assert powerbert.patch_state(model).static_shapes is None
    inputs = _inputs(2, "cuda")
    with pytest.raises(ValueError, match=r"input input_ids must be \(4, 13\)"):
        graph(**{**inputs, "input_ids": inputs["input_ids"][:, :5]})
    with pytest.raises(ValueError, match="exactly the captured ones"):
        graph(input_ids=inputs["input_ids"])


def test_no_mask_built_under_capture_skips_only_an_absent_mask(monkeypatch):
    """transformers refuses to skip the mask while a stream captures, even with no mask at all;
    inside the context an absent mask is skipped (as eagerly) and a real one still decided by
    transformers."""
    from transformers import masking_utils

    from powerbert.cuda_graph import no_mask_built_under_capture

    calls = []
    monkeypatch.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa",
                        lambda padding_mask, *a, **k: calls.append(padding_mask) or False)
    original = masking_utils._ignore_bidirectional_mask_sdpa
    mask = torch.ones(2, 3, dtype=torch.bool)
    with no_mask_built_under_capture():
        assert masking_utils._ignore_bidirectional_mask_sdpa(None) is True
        assert masking_utils._ignore_bidirectional_mask_sdpa(mask) is False
    assert masking_utils._ignore_bidirectional_mask_sdpa is original
    assert len(calls) == 1 and calls[0] is mask
