"""Machine unlearning for image classifiers: SalUn and the baselines, on the shared masking core.

SalUn for classification (Fan et al., ICLR 2024, Sec. 4): the saliency mask comes from the
cross-entropy of the forget set with its true labels; unlearning then fine-tunes only the
salient weights on the forget set relabelled with random wrong labels plus the retain set
with its true labels ("random labelling", RL). Baselines: Retrain (train from scratch on the
retain set, the gold standard), FT (fine-tune on the retain set), GA (gradient ascent on the
forget set), RL (random labelling without the mask) and l1-sparse (FT with a decaying l1
penalty, Jia et al. 2023). Metrics: UA = 100 - forget accuracy, RA, TA and MIA-efficacy.
Data: scikit-learn digits or CIFAR-10, optionally with a fraction of the training labels
flipped (`--label-noise`, `with_label_noise`).

    python -m erase.classifier --dataset digits --forget random:0.1 --method salun --out r.json
"""

from erase.classifier.data import DATASETS, Dataset, load_dataset, parse_forget, random_wrong_labels, with_label_noise
from erase.classifier.methods import DEFAULT_LR, METHODS, UnlearnConfig, run, saliency_mask, train_original, unlearn
from erase.classifier.metrics import evaluate, mia_efficacy
from erase.classifier.model import ResNet
from erase.classifier.training import accuracy, predict_proba, train

__all__ = ["DATASETS", "DEFAULT_LR", "METHODS", "Dataset", "ResNet", "UnlearnConfig", "accuracy", "evaluate", "load_dataset",
           "mia_efficacy", "parse_forget", "predict_proba", "random_wrong_labels", "run", "saliency_mask", "train",
           "train_original", "unlearn", "with_label_noise"]
