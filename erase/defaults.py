"""The one table of defaults that several commands read (a light module: importing it loads nothing).

Sampler defaults by model family: Stable Diffusion's are its diffusers pipeline's; the embedded
digits model's are those it was built and measured with (DDIM). `erase.sd.sampler_defaults` picks
the row for a model. The ImageNet classifier that judges object concepts (Imagenette). The embedded model's name."""

SD_STEPS, SD_GUIDANCE = 50, 7.5
DIGITS_STEPS, DIGITS_GUIDANCE = 25, 5.0  # DDIM steps, classifier-free guidance scale
RESNET_ID = "microsoft/resnet-50"
DIGITS_MODEL_NAME = "digits"  # `--model digits`: the embedded model, and its kind (erase.sd.model_kind)
DIGITS_FLOW_NAME = "digits-flow"  # `--model digits-flow`: its flow-matching twin (SD3 architecture), of the same kind
SD_KIND = "stable-diffusion"  # the kind of every other model
