"""Where does the int4 self-draft disagree with its bf16 target? Top-1 agreement by output-layer variant.

SmolLM2's GGUF stores its linear layers in Q4_1 (groups of 32), which the int4 copy's groups of 32 re-quantize
almost losslessly, and its tied embedding (the output layer) in Q8_0, which int4 does not. This compares the
copy with its int4 output layer, with the target's bf16 one, with an int8 one, and with the int4 one whose top
k logits are recomputed in float (RescoredLinear, what `quantized-self` uses), plus the all-int8 copy and the
bf16 target against itself (teacher-forced full forwards are not bit-identical to one-token decoding, so even
the target itself stays below 1). Same answers and protocol as layer_skip_agreement.py.

    python benchmarks/draft_agreement.py [--model smollm2-135m]
"""
from __future__ import annotations

from layer_skip_agreement import agreement, target_from_args

from tachy.models.quant import Int8Linear, RescoredLinear, plain_linear, quantized_copy


def main() -> None:
    _, target, answers = target_from_args(__doc__.splitlines()[0])
    model = target.model
    head = plain_linear(model.lm_head)

    def copy_with(make_head=None, dtype="int4"):
        copy = quantized_copy(model, dtype)
        if make_head is not None:
            copy.lm_head = make_head(copy.lm_head)
        return copy

    variants = {
        "int4 copy, int4 output layer": copy_with(),
        "int4 copy, bf16 output layer": copy_with(lambda q: model.lm_head),
        "int4 copy, int8 output layer": copy_with(lambda q: Int8Linear(head)),
        **{f"int4 copy, int4 output layer, top {k} rescored": copy_with(lambda q, k=k: RescoredLinear(
            q, head.weight.detach(), k)) for k in (2, 4, 8, 16)},
        "int8 copy": copy_with(dtype="int8"),
        "bf16 target itself": model,
    }
    print("| draft | top-1 agreement with the bf16 target |\n|---|---|")
    for name, draft in variants.items():
        print(f"| {name} | {agreement(draft, answers, list(range(len(draft.layers)))):.3f} |")


if __name__ == "__main__":
    main()
