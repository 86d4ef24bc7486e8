"""Read the losses and validation metrics out of a BasicSR 1.4.2 training log (``train_*.log``).

BasicSR writes, every ``print_freq`` iterations (``basicsr.utils.logger.MessageLogger``)::

    ... INFO: [name..][epoch:  0, iter:   1,000, lr:(2.000e-04,)] [eta: 1:02:03, time (data): 0.210 (0.004)] l_pix: 1.2345e-02

and after each validation (``SRModel._log_validation_metric_values``) a message over several lines::

    ... INFO: Validation Set5
    	 # psnr: 30.1234	Best: 30.1234 @ 1000 iter

The validation message names no iteration. BasicSR validates right after the iterations that are
multiples of ``val_freq`` (and the training message of that iteration, if any, comes first), and once
more after the last iteration; ``val_freq`` and ``total_iter`` are read from the option dump at the top
of the log, so each validation gets its exact iteration.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

_TRAIN = re.compile(r'\[epoch:\s*(\d+), iter:\s*([\d,]+), lr:\(([^)]*)\)\]')
_VALUE = re.compile(r'([A-Za-z_][\w]*): ([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)')
_VALIDATION = re.compile(r'INFO: Validation (.+?)\s*$')
_METRIC = re.compile(r'^\s*# (\w+): ([-+]?[\d.]+(?:[eE][-+]?\d+)?|nan|inf)')
_START = re.compile(r'Start training from epoch: (\d+), iter: (\d+)')
_OPTION = re.compile(r'^\s+(val_freq|total_iter): ([\d.eE+]+)\s*$')

Series = List[Tuple[int, float]]


@dataclass
class TrainingLog:
    """Attributes:
        losses: loss name -> [(iteration, value)], as logged (BasicSR averages over ``print_freq``).
        learning_rates: [(iteration, first optimizer's lr)].
        validation: (dataset, metric) -> [(iteration, value)].
    """
    losses: Dict[str, Series] = field(default_factory=dict)
    learning_rates: Series = field(default_factory=list)
    validation: Dict[Tuple[str, str], Series] = field(default_factory=dict)


def find_log(path: Union[str, Path]) -> Path:
    """The log itself, or the newest ``train_*.log`` in an experiment folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f'{path}: no such experiment folder or log file')
    logs = sorted(path.glob('train_*.log'), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise ValueError(f'{path}: no train_*.log in this folder (is it a BasicSR experiment folder?)')
    return logs[-1]


def _next_validation_iter(val_freq: Optional[int], last_train_iter: int, floor: int) -> int:
    if not val_freq:
        return last_train_iter
    # The smallest multiple of val_freq after the previous validation that is not before the last
    # training message (which BasicSR writes before validating at the same iteration).
    candidate = max(floor // val_freq + 1, -(-last_train_iter // val_freq)) * val_freq
    return candidate


def parse_training_log(text: str) -> TrainingLog:
    log = TrainingLog()
    val_freq: Optional[int] = None
    total_iter: Optional[int] = None
    last_iter = 0
    last_validation = 0
    finished = False
    dataset: Optional[str] = None
    validation_iter = 0
    for line in text.splitlines():
        if dataset is not None:
            metric = _METRIC.match(line)
            if metric:
                log.validation.setdefault((dataset, metric.group(1)), []).append((validation_iter, float(metric.group(2))))
                continue
            dataset = None
        option = _OPTION.match(line)
        if option and not log.losses:  # the option dump comes before any training message
            number = int(float(option.group(2)))
            if option.group(1) == 'val_freq':
                val_freq = number
            else:
                total_iter = number
            continue
        start = _START.search(line)
        if start:
            last_iter = last_validation = int(start.group(2))
            continue
        if 'End of training' in line:
            finished = True
            continue
        train = _TRAIN.search(line)
        if train:
            last_iter = int(train.group(2).replace(',', ''))
            lrs = [float(v) for v in train.group(3).split(',') if v.strip()]
            if lrs:
                log.learning_rates.append((last_iter, lrs[0]))
            # Everything after the last ']' is "name: value" pairs (the eta/time bracket comes before).
            for name, value in _VALUE.findall(line[line.rfind(']') + 1:]):
                log.losses.setdefault(name, []).append((last_iter, float(value)))
            continue
        validation = _VALIDATION.search(line)
        if validation:
            dataset = validation.group(1)
            if finished:
                validation_iter = total_iter if total_iter is not None else last_iter
            else:
                validation_iter = _next_validation_iter(val_freq, last_iter, last_validation)
                last_validation = validation_iter
    # A run whose total_iter is a multiple of val_freq validates the same weights twice at the end.
    for key, series in log.validation.items():
        deduplicated: Dict[int, float] = {}
        for iteration, value in series:
            deduplicated[iteration] = value
        log.validation[key] = sorted(deduplicated.items())
    return log


def read_training_log(path: Union[str, Path]) -> Tuple[Path, TrainingLog]:
    log_path = find_log(path)
    return log_path, parse_training_log(log_path.read_text(encoding='utf-8', errors='replace'))
