"""Every threshold a rule judges by, with the reason for its value.

One module, a table per context: ``THRESHOLDS`` (a live probe), ``RUN_THRESHOLDS`` (a recorded
run), ``CHECKPOINT_THRESHOLDS`` (weights read without data); ``run_rules`` merges them, and a
caller may override any by name.

Thresholds are relative wherever possible (gains through depth, ratios to the loss or to the
He/Xavier expectation) so that they hold across model sizes and data scales. The healthy zoo
(He MLP, ResNet with BN, pre-LN transformer, LSTM, GRU, 24-block residual MLP) stays at least
an order of magnitude inside each warning threshold; ``tests/test_rules.py`` holds the cases,
and the architecture zoo (``tests/test_zoo.py``) holds 62 standard architectures to them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Threshold:
    """A warning and an error level for one measured value.

    Attributes:
        warning: Level at which a warning is raised.
        error: Level at which an error is raised.
        higher_is_worse: Direction: True when values above the levels are bad.
        reason: Why these values.

    """

    warning: float
    error: float
    higher_is_worse: bool
    reason: str

    def severity(self, value: float | None) -> str | None:
        """``error``, ``warning`` or ``None`` for a measured value (``None``/NaN: no verdict)."""
        if value is None or value != value:
            return None
        if self.higher_is_worse:
            return "error" if value >= self.error else "warning" if value >= self.warning else None
        return "error" if value <= self.error else "warning" if value <= self.warning else None


THRESHOLDS: dict[str, Threshold] = {
    "vanishing_depth_gain": Threshold(
        1e-3, 1e-6, False,
        "Gradient norm at a layer's output divided by the gradient norm at the model output. "
        "Under He init or with normalization it stays within ~10x of 1 at every depth (the "
        "healthy zoo: 0.013 at worst, an LSTM's embedding); 1e-3 means the early layers learn "
        "a thousand times slower than the last one under SGD, 1e-6 means they do not learn.",
    ),
    "vanishing_grad_to_weight_per_loss": Threshold(
        1e-4, 1e-6, False,
        "Largest gradient-to-weight ratio ||g||/||w|| over all layers, per unit of loss. A "
        "network whose every layer has a tiny gradient while the loss is still large is not "
        "learning anywhere, even if the ratio first/last layer looks normal (a plain 30-layer "
        "Xavier ReLU net: ~2e-7). Dividing by the loss keeps a converged model, whose "
        "gradients are small because its loss is, from being flagged. Healthy zoo: >= 1e-2.",
    ),
    "input_scale": Threshold(
        10.0, 1e4, True,
        "How far the floating-point inputs' scale is from 1: their RMS (sqrt(mean^2 + std^2)) "
        "or its inverse, whichever is larger. Default initializations assume inputs of about "
        "unit scale: pixels in [0, 255] (RMS ~120) or raw physical units multiply every "
        "pre-activation of the first layer; standardized data and images in [0, 1] (RMS "
        "~0.5) sit near 1. Not judged when the model normalizes its input itself.",
    ),
    "exploding_depth_gain": Threshold(
        1e3, 1e6, True,
        "Gradient norm at a layer's output over the gradient norm at the model output: the "
        "backward signal grows a thousandfold on its way to the early layers (N(0,1) init of "
        "a 10-layer 256-wide ReLU MLP: ~3e9). Healthy zoo: <= 2.",
    ),
    "exploding_grad_to_weight": Threshold(
        10.0, 1e3, True,
        "Gradient-to-weight ratio ||g||/||w||: above 10 an SGD step at lr=0.01 rewrites "
        "a layer's weights by more than their own size. Healthy zoo: <= 1.2 (classifier "
        "heads at init have the largest).",
    ),
    "activation_growth": Threshold(
        1e2, 1e4, True,
        "Largest ratio of a Linear/conv layer's output std to that of an earlier one: the "
        "forward signal is amplified a hundredfold through depth (per-layer weight scale above "
        "He). Healthy zoo: <= 5.",
    ),
    "activation_collapse": Threshold(
        1e-2, 1e-4, False,
        "Smallest ratio of a Linear/conv layer's output std to that of an earlier one: the "
        "forward signal shrinks a hundredfold through depth (per-layer weight scale below He, "
        "e.g. Xavier or PyTorch's default init under ReLU). Healthy zoo: >= 0.2.",
    ),
    "dead_fraction": Threshold(
        0.5, 0.9, True,
        "Share of a ReLU layer's units (features of a Linear layer, channels of a feature map) "
        "that are zero for every probe sample. A He-initialized MLP has a few percent of its "
        "features dead (up to ~16% in deep layers with a 64-sample probe; a feature map's "
        "channels, silent only if silent at every pixel, fewer); half the layer dead halves "
        "its capacity; at 90% the layer passes almost no gradient.",
    ),
    "dead_channel_fraction": Threshold(
        0.25, 0.75, True,
        "Share of a BatchNorm layer's channels whose gamma is below 1e-3 of the layer's "
        "largest, or whose running variance is below 1e-6 of the largest: those channels "
        "output a constant. Trained networks keep a few percent; a quarter of a layer is "
        "capacity lost, three quarters a layer that barely passes a signal.",
    ),
    "saturated_fraction": Threshold(
        0.25, 0.6, True,
        "Share of a sigmoid/tanh-family output whose local derivative is below 5% of its "
        "maximum. Xavier-initialized tanh layers on standardized inputs have ~3%.",
    ),
    "weight_scale": Threshold(
        4.0, 16.0, True,
        "Median over Linear/conv layers of the weight RMS over its He/Xavier std, judged only "
        "together with a cross-entropy loss above twice that of an uninformed model "
        "(LOSS_AT_INIT_FACTOR x log C): weights that big make the logits huge and the model "
        "confidently wrong, even when normalization layers keep activations in range (a GPT-2 "
        "built with initializer_range 1.0 instead of 0.02: 8x at width 64, loss 23 against "
        "log(V) = 6.2). Standard inits sit at 0.15-1.2x; a trained model may grow its weights "
        "but has a low loss.",
    ),
}

# A cross-entropy loss above this factor of log(classes) is far worse than an uninformed model.
LOSS_AT_INIT_FACTOR = 2.0

RUN_THRESHOLDS: dict[str, Threshold] = {
    "grad_to_weight_spread": Threshold(
        1e-4, 1e-7, False,
        "Smallest over largest gradient-to-weight ratio among the Linear/conv layers of a "
        "sampled step (median over the second half of the run): the early layers learn that "
        "much slower than the late ones. Healthy models: >= 1e-3 (ResNet with BN 2e-3, pre-LN "
        "transformer 6e-3); 20 stacked sigmoids: 1e-17.",
    ),
    "grad_to_weight": Threshold(
        10.0, 1e3, True,
        "Largest gradient-to-weight ratio of any layer (median over the second half of the "
        "run), as for inspect's exploding_gradients.",
    ),
    "update_ratio_high": Threshold(
        0.05, 0.5, True,
        "Median ||w_after - w_before|| / ||w_before|| of a layer over the run. The rule of "
        "thumb is ~1e-3 per step; above 5% a layer is rewritten within twenty steps and "
        "training is unstable; above 50% it is noise.",
    ),
    "update_ratio_low": Threshold(
        1e-5, 1e-8, False,
        "Median update ratio of a layer over the run: below 1e-5 a layer needs ~1e5 steps to "
        "change by its own size -- it is effectively not learning (too low a learning rate, or "
        "a vanishing gradient).",
    ),
    "loss_oscillation": Threshold(
        0.4, 1.0, True,
        "Spread of the loss around its running median (1.4826 x MAD) over the second half of "
        "the run, relative to the loss level there, while the loss has stopped falling above "
        "5% of its start: an oscillating run swings by a large share of its own level (Adam at "
        "20x its usual learning rate: ~50%). A noisy run that is still falling is not judged, "
        "nor one stalled below 5% of its start, whose batch-to-batch noise is that of a few "
        "hard examples per batch and as large as its level in healthy classifiers.",
    ),
}

# Below this many probe samples a unit that never fired is not evidence of a dead unit.
MIN_SAMPLES_FOR_DEAD_UNITS = 8
# A layer of fewer units (values per sample) is not judged for dead units: its share is a
# handful of units and moves by a large step with each one (a squeeze-and-excitation bottleneck
# of 4 units, on features pooled over the image that vary little between samples at init).
MIN_UNITS_FOR_DEAD_FRACTION = 8
# A unit counts as blocking gradients when its layer is at least this dead.
FULLY_DEAD = 0.99

# The data-free analysis's own thresholds (``rules/checkpoint.py``): weights against their
# family's init scale, and BatchNorm gains. A rule reads them from the thresholds it is given
# when present there (so that callers can override them), else from here.
CHECKPOINT_THRESHOLDS: dict[str, Threshold] = {
    "init_scale_untrained": Threshold(
        10.0, 30.0, True,
        "Weight RMS of an untrained transformer projection over the std its family initializes "
        "it with. A standard init sits at 1x (0.9-1.1x in the healthy zoo: BERT, GPT-2, Llama, "
        "ViT, T5, nn.Transformer); PyTorch's default Linear init judged against 0.02 stays "
        "under 10x down to a width of 8. At 10x the attention logits are 100x their intended "
        "scale and at 30x the softmax is one-hot from the first step (GPT-2 with "
        "initializer_range=1.0: 50x, loss 23 against ln(vocab) = 6.2).",
    ),
    "init_scale_untrained_low": Threshold(
        0.1, 0.01, False,
        "The same ratio for the projections that read the residual stream (queries, keys, "
        "values, MLP inputs), below: a tenth of the family's scale leaves uniform attention "
        "and blocks that pass almost nothing, and under Adam every early step rewrites these "
        "weights entirely. Output projections and heads are not judged low: starting them "
        "small (or at zero) is a deliberate choice.",
    ),
    "batch_norm_gain": Threshold(
        0.1, 0.05, False,
        "Median RMS of the BatchNorm gains (gamma), those set exactly to zero on purpose left "
        "out. PyTorch and every reference implementation start them at 1, and trained CNNs "
        "keep them around 0.2-1.5; at 0.05 every normalization shrinks the signal 20x, and at "
        "0.02 (gains drawn like weights, N(0, 0.02), as a "
        "library init that treats every weight alike does) each normalization multiplies the "
        "signal by ~0.02, it vanishes within a few blocks and the network cannot fit even one "
        "batch (a Hugging Face EfficientNet so initialized: loss 1.44 after 60 Adam steps "
        "against 0.004 with gains at 1).",
    ),
    "init_scale_trained": Threshold(
        30.0, 100.0, True,
        "The same ratio for trained weights, which legitimately drift from their init: the "
        "pretrained all-MiniLM-L6-v2 sits at 0.45-4x, pretrained BERT and GPT-2 projections "
        "at 1-10x. Thirty times the family's scale is no longer drift: the weights grew "
        "unchecked during training (no weight decay, a learning rate too high) or started "
        "that far off.",
    ),
}
