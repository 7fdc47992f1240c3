"""Every seed derivation in one place: how one configured seed becomes the seed of each random
stream, so that streams never coincide by accident and a change to one is a change here.

Primes keep the streams apart: fold k and epoch e of one run, rank r of a distributed run, and
the fine-tuning of a compressed variant each get their own value. The values are part of what a
run reproduces (the same config gives the same split and, on one CPU, the same metrics), so a
change to any formula changes results: the tests compare runs with each other, never with
numbers written down.
"""

FOLD = 7919  # the 1000th prime: fold k's streams start k * FOLD apart
RANK = 104723  # rank r's augmentation draws, r * RANK apart
FINETUNE = 104729  # a compressed variant's fine-tuning data order, apart from training's
FINETUNE_EPOCHS = 10_000  # fine-tuning epochs are numbered from here, apart from training's
TRAIN_METRICS = 1299709  # the 100,000th prime: the training images scored for train-set metrics
VAL_OVERSAMPLE = 15485863  # the 1,000,000th prime: the oversampled validation draw
REPEAT = 2750159  # the 200,000th prime: repeat r of a fold trains with its seed r * REPEAT apart


def split_test(seed: int) -> int:
    """The held-out test set's draw among patient groups."""
    return seed


def split_folds(seed: int) -> int:
    """The folds' draw among the patient groups outside the test set."""
    return seed + 1


def data_order(seed: int, fold: int) -> int:
    """The training batches' order (with the epoch: ``CachedBatches``)."""
    return seed + FOLD * fold


def finetune_order(seed: int, fold: int) -> int:
    """A compressed variant's fine-tuning batches' order."""
    return seed + FOLD * fold + FINETUNE


def torch_global(seed: int, epoch: int, rank: int = 0) -> int:
    """torch's global generator for an epoch (dropout and the like)."""
    return seed * 100003 + epoch + 7 * rank


def augmentation(seed: int, fold: int, epoch: int, rank: int = 0) -> int:
    """The augmentation draws of an epoch, on each rank its own."""
    return seed * 1000003 + FOLD * fold + epoch + RANK * rank


def explained_images(seed: int, fold: int) -> int:
    """Which test images a fold's explanations show."""
    return seed + fold


def lime(seed: int, fold: int, image: int) -> int:
    """LIME's perturbations of one explained image."""
    return seed + FOLD * fold + image


def train_metrics(seed: int, fold: int) -> int:
    """Which training images are scored every epoch for the train-set metrics."""
    return seed + FOLD * fold + TRAIN_METRICS


def val_oversample(seed: int, fold: int) -> int:
    """The validation images drawn (with replacement) to the stated class shares."""
    return seed + FOLD * fold + VAL_OVERSAMPLE


def repeat(seed: int, r: int) -> int:
    """The training seed of repeat ``r`` of a fold (``experiments.<name>.repeats``); repeat 0 is
    the seed itself, so a first repeat is the fold model trained without repeats."""
    return seed + REPEAT * r
