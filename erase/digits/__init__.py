"""The embedded text-to-image model: a small Stable Diffusion pipeline trained on sklearn digits.

No model hub is reachable where this toolkit is developed and tested, so it ships its own
text-to-image model in the ordinary diffusers format. scikit-learn's 8x8 digits are
bilinear-upscaled to 32x32 and drawn in colour on a black background; prompts follow
`PROMPT_TEMPLATE` ("a red handwritten digit seven"), plus paraphrases ("digit 7",
"the number 7 in red", ...) so that an erasure can be tested against wordings it was not
trained to forget. Concepts: ten digits (objects) and `COLOURS` (styles).

Data split (fixed, by the index ``i`` of ``sklearn.datasets.load_digits()``, never shuffled):

* ``i % 10 in 0..4`` -> "generator":  the VAE and UNet train on these (900 images);
* ``i % 10 in 5..8`` -> "classifier": the judging classifier trains on these (718 images);
* ``i % 10 == 9``    -> "test":       held out from both, to measure the classifier (179).

The classifier never sees an image the generator was trained on, so it judges what the
generator learned rather than what it memorised.

Two models share the data, the prompts and the autoencoder: ``digits`` (digits-sd, a
StableDiffusionPipeline with a UNet) and ``digits-flow`` (a StableDiffusion3Pipeline: an MMDiT
transformer trained by rectified flow; see ``flow``).

Modules: ``prompts`` (words, template, paraphrases, tokenizer), ``data`` (splits, colouring),
``build`` (training digits-sd, and the loop both share), ``flow`` (training digits-flow), ``paths``
(assets, cache), ``locate`` (``--model digits`` / ``digits-flow``: recognising them, their folders),
``judge`` (the classifier), ``__main__`` (the command).

``python -m erase.digits --train --output-dir DIR`` rebuilds the pipeline from scratch (``--flow``:
digits-flow);
``--train-classifier --classifier-out FILE`` rebuilds the classifier. Weights, data order,
noise and prompt choice all come from the seed, so a rebuild is bit-identical for the same
seed, library versions and torch thread count; CPU kernels split their sums by thread, so a
different thread count gives a model that differs in its weights but not in its quality.
The thread count is recorded in ``digits_training.json``.
"""

from __future__ import annotations

from erase.digits.build import DigitsTrainingOptions, train_pipeline
from erase.digits.data import (
    RESOLUTION,
    SPLITS,
    coloured_split,
    load_split,
    render_digits,
)
from erase.digits.judge import (
    ClassifierTrainingOptions,
    DigitsClassifier,
    classify_images,
    load_digits_classifier,
    train_classifier,
)
from erase.digits.locate import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    FLOW_MODEL_NAME,
    MODEL_NAME,
    MODEL_NAMES,
    is_digits_model,
    resolve_model,
)
from erase.digits.paths import CLASSIFIER_PATH, FLOW_MODEL_DIR, MODEL_DIR, cache_dir
from erase.digits.prompts import (
    COLOUR_PARAPHRASES,
    COLOURS,
    DIGIT_PARAPHRASES,
    DIGIT_WORDS,
    FULL_PARAPHRASES,
    PROMPT_TEMPLATE,
    build_t5_tokenizer,
    build_tokenizer,
    paraphrases_for,
    prompt_for,
    training_prompts,
    unknown_tokens,
    vocabulary_words,
)

__all__ = [
    "CLASSIFIER_PATH",
    "COLOURS",
    "COLOUR_PARAPHRASES",
    "ClassifierTrainingOptions",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "DIGIT_PARAPHRASES",
    "DIGIT_WORDS",
    "DigitsClassifier",
    "DigitsTrainingOptions",
    "FULL_PARAPHRASES",
    "FLOW_MODEL_DIR",
    "FLOW_MODEL_NAME",
    "MODEL_DIR",
    "MODEL_NAME",
    "MODEL_NAMES",
    "PROMPT_TEMPLATE",
    "RESOLUTION",
    "SPLITS",
    "build_t5_tokenizer",
    "build_tokenizer",
    "cache_dir",
    "classify_images",
    "coloured_split",
    "is_digits_model",
    "load_digits_classifier",
    "load_split",
    "paraphrases_for",
    "prompt_for",
    "render_digits",
    "resolve_model",
    "train_classifier",
    "train_pipeline",
    "training_prompts",
    "unknown_tokens",
    "vocabulary_words",
]
