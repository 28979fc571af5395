"""``fusechat study RECIPE --worlds 3 --seeds 0 1 2 3 4``: does fusion beat plain fine-tuning,
and merging beat fusion, over toy worlds and seeds?

The recipe runs once per (world, seed) pair (``--set seed=N``; captures, alignments and fused
targets do not depend on the seed and are shared). Every run is fair by construction: the CLM
baseline and the fused targets train on the same rows in the same order, for the same steps,
learning rate and seed; the held-out questions are never trained on. Every comparison is
paired by (world, seed): per pairwise target its gain over the CLM baseline, per merge its gain
over CLM and over the best pairwise target, each as the mean of the pairs' differences with a
95% paired t interval and the pairs won; per model the mean and deviation of held-out nats/char
(by skill) and the judge average; the token-efficiency ratio (FuseLLM's: the training tokens the
CLM baseline needs to reach its final held-out loss, over the tokens the fused target needs to
reach the same), read from the held-out curves that training logs (``train.heldout``,
``train.eval_steps``); and the weight-space figures (``fusechat.weightspace``). ``study.png``
plots the curves with bands and the interpolation lines.
"""
