"""--torch_compile's step (issue #40): every family's forward and loss trace as one graph (no graph break: no host
sync, nothing data-dependent, so CUDA graphs can capture it), a compiled step gives the eager step's loss and
gradients, and a family whose step cannot compile whole is refused the CUDA-graph modes in one line."""
import pytest
import torch

from conftest import SEGMENTERS, base_model
from giseg.models.registry import FAMILIES

pytestmark = pytest.mark.slow  # (bash run_tests.sh -m "not slow": the quick part; tracing every family takes 25 s)
CLASSES = ("large_bowel", "small_bowel", "stomach")


def _step(family, tiny_models, tmp_path):
    """(the trainer's forward + loss of one batch as a function, its inputs, the model) for ``family``."""
    from giseg.inference.segmenter import upsample_like
    from giseg.models.load import load_model
    from giseg.models.wrapper import SegmentationModel, blank_input
    from giseg.training.build import install_output_hooks
    from giseg.training.losses import make_loss

    torch.manual_seed(0)
    model = SegmentationModel(load_model(base_model(family, tiny_models, tmp_path), "multilabel", CLASSES).model)
    size = max(32, FAMILIES[family].min_size)
    install_output_hooks(model, size)
    model.train()
    loss_fn = make_loss("bce_dice", "multilabel", CLASSES)

    def step(pixels, masks):
        logits, aux = model(pixels)
        if logits.ndim == 5:  # a 3D model: the loss sees the patch's slices (training/loop.py)
            logits, masks = logits.transpose(1, 2).flatten(0, 1), masks.flatten(0, 1)
        loss = loss_fn(upsample_like(logits, masks.shape[-2:]), masks, None)
        return loss if aux is None else loss + 0.4 * loss_fn(upsample_like(aux, masks.shape[-2:]), masks, None)

    shape = tuple(blank_input(model.hf, size).shape[2:])  # (S, S), or a 3D model's smallest patch
    pixels = torch.randn(2, blank_input(model.hf, size).shape[1], *shape, generator=torch.Generator().manual_seed(1))
    masks = torch.randint(0, 8, (2, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    return step, (pixels, masks), model


@pytest.mark.parametrize("family", [f for f in SEGMENTERS if not FAMILIES[f].graph_breaks])
def test_every_familys_training_step_compiles_as_one_graph(family, tiny_models, tmp_path):
    """Every family the registry says compiles whole (the others: the CUDA-graph refusal below)."""
    step, inputs, _ = _step(family, tiny_models, tmp_path)
    explained = torch._dynamo.explain(step)(*inputs)
    torch._dynamo.reset()
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, (family, reasons)


def test_a_compiled_step_gives_the_eager_steps_loss_and_gradients(tiny_models, tmp_path):
    """AOTAutograd's traced forward and backward (the aot_eager backend: inductor's code generation is the GPU check's
    to time, benchmarks/gpu_check.sh) against eager, on SegFormer's step."""
    step, inputs, model = _step("segformer", tiny_models, tmp_path)
    torch.manual_seed(3)  # (the same dropout draws in both)
    eager = step(*inputs)
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*inputs)
    compiled.backward()
    torch._dynamo.reset()
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6), (compiled.item(), eager.item())
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) > 10
    for name, grad in got.items():
        assert torch.allclose(grad, want[name], rtol=1e-4, atol=1e-6), name


def test_cuda_graph_modes_are_refused_in_one_line_for_a_step_with_graph_breaks():
    from giseg.models.registry import compile_refusal

    breaks = [f for f in FAMILIES.values() if f.graph_breaks]
    assert breaks  # (Mask2Former's)
    for family in breaks:
        line = compile_refusal(family.model_type, "reduce-overhead", family.encoder)
        assert "captures CUDA graphs" in line and family.name in line and "\n" not in line
        assert compile_refusal(family.model_type, "default", family.encoder) == ""
    assert compile_refusal("segformer", "reduce-overhead") == ""
    assert compile_refusal("gi_volume", "reduce-overhead", "segresnet") == ""  # (a model_type two families share)
