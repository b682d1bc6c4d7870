"""Weight formats (models/quant.py): the rescored int4 output layer of the default drafter's copy."""
import pytest
import torch
from torch import nn

from tachy.models.quant import Int4Linear, RescoredLinear, quantized_copy
from tests.conftest import tiny_model


def test_rescored_layer_recomputes_its_top_logits_with_the_float_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 512, bias=False).to(torch.bfloat16)
    quantized = Int4Linear(linear)
    layer = RescoredLinear(quantized, linear.weight.detach(), top=8)
    x = torch.randn(200, 64).to(torch.bfloat16)
    with torch.inference_mode():
        rescored, plain = layer(x), quantized(x).float()
        exact = (x.float() @ linear.weight.float().t()).to(torch.bfloat16).float()   # what the bf16 layer gives
    top = plain.topk(8, dim=-1).indices
    changed = torch.zeros_like(plain, dtype=torch.bool).scatter_(-1, top, True)
    assert rescored.dtype == torch.float32
    assert torch.equal(rescored[~changed], plain[~changed])                       # the rest stay int4
    assert torch.allclose(rescored[changed], exact[changed], atol=1e-3, rtol=2 ** -7)   # up to one bf16 step
    # where the float layer's choice is among the int4 layer's top 8, the rescored layer picks it
    reachable = (top == exact.argmax(-1, keepdim=True)).any(-1)
    assert reachable.float().mean() > 0.9
    assert torch.equal(rescored.argmax(-1)[reachable], exact.argmax(-1)[reachable])
    # and that is more often than the plain int4 layer does
    assert (rescored.argmax(-1) == exact.argmax(-1)).sum() > (plain.argmax(-1) == exact.argmax(-1)).sum()


def test_quantized_copy_rescores_with_the_original_output_weights_shared():
    model = tiny_model("llama", seed=1).to(torch.bfloat16)
    copy = quantized_copy(model, "int4", rescore_top=4)
    assert isinstance(copy.lm_head, RescoredLinear) and copy.lm_head.top == 4
    assert copy.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()     # shared, not copied
    assert not isinstance(quantized_copy(model, "int4").lm_head, RescoredLinear)  # off by default


@pytest.mark.slow
def test_rescoring_brings_smollm2s_int4_copy_to_the_bf16_targets_choices(smollm_torch):
    """The int4 copy of SmolLM2 (Q4_1 weights, re-quantized losslessly up to bf16 rounding) disagrees with the
    bf16 target mostly through its int4 output layer (the GGUF's is Q8_0): rescored, it makes nearly the choices
    the target itself makes teacher-forced over its own answers (full forwards are not bit-identical to
    one-token decoding, so not even the target scores 100%)."""
    from tachy import GenerationConfig

    smollm = smollm_torch
    target = smollm.model
    rescored, plain = quantized_copy(target, "int4", rescore_top=8), quantized_copy(target, "int4")
    hits = {"rescored": 0, "plain": 0, "target": 0}
    total = 0
    for question in ["Write a short poem about the sea.", "Explain what a binary search does."]:
        prompt = smollm.chat_prompt([{"role": "user", "content": question}])
        answer = [t for r in smollm.stream(prompt, GenerationConfig(max_new_tokens=48, drafter=None))
                  for t in r.token_ids]
        seq = prompt + answer
        with torch.inference_mode():
            for name, model in (("rescored", rescored), ("plain", plain), ("target", target)):
                logits = model(torch.tensor([seq]), torch.arange(len(seq)), model.new_cache(len(seq)))[0]
                guesses = logits[len(prompt) - 1:len(seq) - 1].argmax(-1).tolist()
                hits[name] += sum(g == a for g, a in zip(guesses, answer))
        total += len(answer)
    assert hits["rescored"] / total >= 0.9
    # rescoring closes most of the gap between the plain int4 copy and the target's own teacher-forced choices
    # (measured 82, 91 and 95 of 96)
    assert hits["rescored"] - hits["plain"] >= 0.5 * (hits["target"] - hits["plain"]) > 0
