"""Worst-case forget sets: the data, classes or prompts that are hardest to unlearn.

"Challenging Forgets" (Fan, Liu, Hero and Liu, ECCV 2024, arXiv:2403.07362) picks the forget
set adversarially instead of at random, by bi-level optimisation over weights w in [0, 1]^n
on n candidate items (training samples, classes or prompts) with sum(w) = m:

    min_w  sum_i w_i * l_i(theta(w)) + gamma * ||w||^2              (upper level)
    theta(w) = a few unlearning steps from theta_0 on                  (lower level)
               L_MU(theta; w) = mean_j [(1 - w_j) * retain_j(theta) + w_j * forget_j(theta)]

l_i is the forget loss of item i *after* unlearning (cross-entropy with the true label for a
classifier, averaged over the class for class-wise search; the denoising loss of the prompt's
own images for Stable Diffusion, or with `prompt_loss="contrast"` that loss minus the same loss
under the anchor prompt, so that how easy a prompt's images are to denoise at all cancels out):
minimising it
selects the items the unlearned model still fits best, i.e. the hardest to forget. retain_j and
forget_j are the unlearning method's two terms (FT: CE / 0; RL and SalUn: CE / CE with a random
wrong label; GA: 0 / -CE; SalUn for diffusion: beta * denoising MSE / MSE to the anchor
prompt's prediction; ESD: 0 / MSE to the negatively guided target). The final set is the top m
of w.

Upper-level step (projected gradient descent):

    w <- P(w - w_lr * z(g)),   g = dF/dw,  z = a robust z-score,   P = projection onto {0 <= w <= 1, sum w = m}

P is computed by bisection on the shift mu of clamp(a - mu, 0, 1) (`project_capped_simplex`).
The reference code steps by w_lr * g without normalisation; with the small losses of a trained
model that step is far below the spacing of the projection and w stays at its random start,
so g is replaced by a robust z-score across items (centred at the median, divided by the
scaled median absolute deviation, clipped at +-3; `normalised_step`): w_lr is then the typical
change of one weight per step. A constant added to g does not change P(w - g), and the ordering
of the items' gradients is kept. Keep w_lr small (0.1): items outside the set are trained on by
the lower level and so always look well fitted; large steps swap the whole set at once and the
search oscillates between the current forget set and its complement (measured on digits: w_lr
0.3 raised the upper objective, 0.05-0.1 lowered it monotonically).

Hypergradient (`SearchOptions.hypergradient`):

* ``"direct"`` (default): dF/dw_i = l_i(theta_K) + 2 gamma w_i, what the reference code of the
  paper computes (OPTML-Group/Unlearn-WorstCase). It is exact, not an approximation, when the
  lower level is sign-SGD (the paper's choice and the default here for data and classes): the
  Jacobian d theta_K / d w of K sign steps is zero almost everywhere (sign is piecewise
  constant). With Adam (the default for prompts, as in the paper's prompt-wise ESD code) it
  drops the implicit term.
* ``"unrolled"``: the direct term plus a one-step unrolled implicit term. The last lower step is
  treated as a plain gradient step theta_K = theta_{K-1} - eta * grad L_MU, which gives
  d theta_K / d w_i = -eta * grad_theta (forget_i - retain_i) / N, and with theta_{K-1} ~ theta_K
  the extra term is -eta / N * <grad_theta F, grad_theta (forget_i - retain_i)>, evaluated for all
  i at once by a central finite difference of (forget_i - retain_i) along grad_theta F (two
  forward passes, no Hessian). eta = `unroll_lr`.

The output of `--target data|class` is a JSON list of training indices (an `indices:` file for
`python -m erase.classifier`; they index the split of `load_dataset(dataset, seed, label_noise)`,
so pass the same --seed and --label-noise); of `--target prompt` a JSON list of prompts.
`--report` adds w, the search history and timings.

Modules: ``solver`` (projection, lower-level loop, hypergradient, search), ``config`` (the
command's options), ``classifier`` (data- and class-wise problems), ``prompt`` (the prompt-wise
problem on a Stable Diffusion UNet), ``cli`` (the command).

    python -m erase.worst_case --target data --dataset digits --size 0.1 --method rl --out forget.json
    python -m erase.classifier --dataset digits --forget indices:forget.json --method rl --out r.json
    python -m erase.worst_case --target prompt --model digits --size 4 --method salun --out prompts.json
"""

from __future__ import annotations

from erase.worst_case.classifier import (
    ClassifierProblem,
    classifier_problem,
    forget_indices,
    run_classifier,
)
from erase.worst_case.cli import main, run
from erase.worst_case.config import (
    CLASSIFIER_METHODS,
    PROMPT_LOSSES,
    PROMPT_METHODS,
    TARGETS,
    WorstCaseConfig,
    random_start,
)
from erase.worst_case.prompt import (
    PromptData,
    PromptProblem,
    build_prompt_problem,
    digits_candidates,
    load_candidates,
    prepare_prompt_data,
    run_prompt,
)
from erase.worst_case.solver import (
    BilevelProblem,
    LowerOptions,
    SearchOptions,
    SearchResult,
    SignSGD,
    hypergradient,
    implicit_term,
    make_optimizer,
    normalised_step,
    project_capped_simplex,
    resolve_size,
    search,
    top_m,
    unlearning_steps,
)

__all__ = [
    "BilevelProblem",
    "CLASSIFIER_METHODS",
    "ClassifierProblem",
    "LowerOptions",
    "PROMPT_LOSSES",
    "PROMPT_METHODS",
    "PromptData",
    "PromptProblem",
    "SearchOptions",
    "SearchResult",
    "SignSGD",
    "TARGETS",
    "WorstCaseConfig",
    "build_prompt_problem",
    "classifier_problem",
    "digits_candidates",
    "forget_indices",
    "hypergradient",
    "implicit_term",
    "load_candidates",
    "main",
    "make_optimizer",
    "normalised_step",
    "prepare_prompt_data",
    "project_capped_simplex",
    "random_start",
    "resolve_size",
    "run",
    "run_classifier",
    "run_prompt",
    "search",
    "top_m",
    "unlearning_steps",
]
