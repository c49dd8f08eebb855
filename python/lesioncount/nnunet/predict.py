"""nnU-Net v2 prediction with the lesion count of every case computed in memory (``lesioncount nnunet-predict``).

:class:`CountingPredictor` is nnU-Net's own ``nnUNetPredictor`` (same preprocessing, sliding window,
test-time mirroring, fold ensembling, resampling and segmentation export). One thing changes: the
background export workers, which turn each case's logits into the segmentation nnU-Net writes, also
keep the class probabilities (as ``nnUNetv2_predict --save_probabilities`` computes them), count the
lesion channel with :func:`lesioncount.report.count_volume` and write ``CASE.json``
(:func:`lesioncount.report.case_report`). The ``CASE.npz`` / ``CASE.pkl`` files are written only
with ``save_probabilities=True``, as in nnU-Net.

The report of a case is the one ``lesioncount count`` writes for nnU-Net's ``--save_probabilities``
output of the same model: the same probabilities (``(C, z, y, x)`` -> channel, transposed to ``(x,
y, z)``), the same geometry (the affine of the ``CASE.nii.gz`` segmentation nnU-Net just wrote, read
with nibabel), the same settings. Only ``timings_s`` differ (here ``predict_s``: the network on this
case in the main process; ``export_s``: nnU-Net's resampling and writing; ``count_s``; ``write_s``),
and ``file`` when no ``.npz`` is written (then the segmentation's path).

Example:
    >>> from lesioncount.nnunet.predict import CountingPredictor, CountJob     # doctest: +SKIP
    >>> predictor = CountingPredictor(device=torch.device("cpu"))                 # doctest: +SKIP
    >>> predictor.initialize_from_trained_model_folder(model_folder, (0,))        # doctest: +SKIP
    >>> results = predictor.predict_and_count(lists, ["out/case_000"], [CountJob(...)])  # doctest: +SKIP
"""
from __future__ import annotations

import multiprocessing
import os
import pathlib
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .._extras import require

require("nnunetv2", "lesioncount nnunet-predict")

from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import save_pickle  # noqa: E402
from nnunetv2.inference import predict_from_raw_data as _nnunet_predict  # noqa: E402
from nnunetv2.inference.export_prediction import (  # noqa: E402
    convert_predicted_logits_to_segmentation_with_correct_shape,
)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: E402
from nnunetv2.inference.sliding_window_prediction import compute_gaussian  # noqa: E402
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy  # noqa: E402
from nnunetv2.utilities.helpers import empty_cache  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot  # noqa: E402

from ..io import JSONText, format_json, write_json  # noqa: E402
from ..report import CountSettings  # noqa: E402

__all__ = ["CountJob", "CaseResult", "CountingPredictor", "export_and_count", "find_trainer_class"]

#: File endings whose segmentation nibabel reads, i.e. that give the geometry of the count report.
NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass
class CountJob:
    """What to count for one case and where to write it (picklable: sent to an export worker).

    Attributes:
        case: case id (``CASE``).
        json_path: where ``CASE.json`` goes.
        settings: :class:`lesioncount.report.CountSettings` (``channel`` = the probability channel).
        save_labels: also write ``CASE_labels.nii.gz`` (the candidate label map) next to the JSON.
        predict_s: seconds the network took on this case (filled in by the predictor).
    """

    case: str
    json_path: str
    settings: CountSettings
    save_labels: bool = False
    predict_s: float = 0.0


@dataclass
class CaseResult:
    """Outcome of one case: ``report`` (the ``CASE.json`` dict) or ``error`` (a message), never both."""

    case: str
    report: Optional[dict] = None
    error: Optional[str] = None


def find_trainer_class(name: str):
    """The trainer class of that name: lesioncount's own classes directly, any other name through
    nnU-Net's search (its package, then ``nnUNet_extTrainer``).

    nnU-Net's search imports every trainer module it ships, and some (Primus) need timm; resolving
    our own classes directly lets ``nnunet-predict`` load a count-trainer model where timm is absent.

    Example:
        >>> find_trainer_class("nnUNetTrainerCount").__name__   # doctest: +SKIP
        'nnUNetTrainerCount'
    """
    from . import trainer as ours

    cls = getattr(ours, name, None)
    if isinstance(cls, type) and issubclass(cls, ours.nnUNetTrainer):
        return cls
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(name)


def _count_probabilities(probabilities: np.ndarray, affine: np.ndarray, volume_path: str, job: CountJob) -> dict:
    """Count ``probabilities[channel]`` ((C, z, y, x), nnU-Net's order) as ``lesioncount count`` counts
    the ``.npz``; returns the report (``timings_s`` holds ``count_s``)."""
    from ..io import Volume, c_contiguous
    from ..report import case_report, count_volume

    t0 = time.perf_counter()
    channel = job.settings.channel
    if not 0 <= channel < probabilities.shape[0]:
        raise ValueError(f"--channel {channel} out of range: nnU-Net's probabilities have {probabilities.shape[0]} "
                         f"channels (shape {probabilities.shape})")
    chosen = probabilities[channel]
    if chosen.dtype not in (np.float32, np.float64):
        chosen = chosen.astype(np.float32)  # as lesioncount.io reads a float16 .npz
    data = c_contiguous(chosen.transpose(2, 1, 0))
    volume = Volume(data=data, affine=affine, name=job.case, path=pathlib.Path(volume_path))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # one case per export worker, as `lesioncount count` counts one case per thread
    try:
        counted = count_volume(volume, job.settings)
    finally:
        torch.set_num_threads(previous)
    report = case_report(volume, counted, job.settings)
    if job.save_labels:
        from ..io import write_label_map

        labels_path = pathlib.Path(job.json_path).with_name(f"{job.case}_labels.nii.gz")
        write_label_map(labels_path, counted.result.labels[0].numpy(), affine)
    report["timings_s"] = {"count_s": time.perf_counter() - t0}
    return report


def export_and_count(predicted_logits, properties: dict, configuration_manager, plans_manager, dataset_json: dict,
                     output_file_truncated: str, save_probabilities: bool, job: CountJob) -> CaseResult:
    """nnU-Net's ``export_prediction_from_logits`` plus the count of the case (runs in an export worker).

    Resamples the logits to the original image (``convert_predicted_logits_to_segmentation_with_correct_shape``
    with the probabilities kept), writes the segmentation ``output_file_truncated + file_ending`` with
    the plans' reader/writer (and ``.npz`` / ``.pkl`` with ``save_probabilities``), exactly as nnU-Net
    does; then counts the lesion channel and writes ``job.json_path``.

    Args:
        predicted_logits: (C, z', y', x') logits of the preprocessed case (nnU-Net's order).
        properties: nnU-Net's properties of the case (spacing, cropping box, ...).
        configuration_manager, plans_manager, dataset_json: the model's, as nnU-Net passes them.
        output_file_truncated: output path without the file ending.
        save_probabilities: also write ``CASE.npz`` (key ``probabilities``, (C, z, y, x)) and ``CASE.pkl``.
        job: :class:`CountJob`.

    Returns:
        :class:`CaseResult`. A failure of the count is returned (the segmentation is written);
        a failure of nnU-Net's export raises, as in ``nnUNetv2_predict``.
    """
    t0 = time.perf_counter()
    label_manager = plans_manager.get_label_manager(dataset_json)
    segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits, plans_manager, configuration_manager, label_manager, properties, return_probabilities=True)
    del predicted_logits
    if save_probabilities:
        np.savez_compressed(output_file_truncated + ".npz", probabilities=probabilities)
        save_pickle(properties, output_file_truncated + ".pkl")
    seg_path = output_file_truncated + dataset_json["file_ending"]
    plans_manager.image_reader_writer_class().write_seg(segmentation, seg_path, properties)
    del segmentation
    export_s = time.perf_counter() - t0
    try:
        nib = require("nibabel", "lesioncount nnunet-predict")
        header = nib.load(seg_path)  # the geometry, as `lesioncount count` reads it next to the .npz
        affine = np.asarray(header.affine, dtype=np.float64)
        shape = tuple(int(s) for s in header.shape[:3])
        if shape != tuple(probabilities.shape[1:][::-1]):
            raise ValueError(f"shape mismatch: probabilities {tuple(probabilities.shape)} (C, z, y, x) but the "
                             f"segmentation {seg_path} has shape {shape} (x, y, z)")
        volume_path = output_file_truncated + ".npz" if save_probabilities else seg_path
        report = _count_probabilities(probabilities, affine, volume_path, job)
        del probabilities
        # the layout of `lesioncount count` (io.format_json: CASE.json files of both commands compare
        # equal); write_s is the formatting time of the members, which are formatted before the timings
        t1 = time.perf_counter()
        members = {key: JSONText(format_json(value, 1)) for key, value in report.items() if key != "timings_s"}
        report["timings_s"] = {"predict_s": job.predict_s, "export_s": export_s, **report["timings_s"],
                               "write_s": time.perf_counter() - t1}
        write_json(job.json_path, {key: report[key] if key == "timings_s" else members[key] for key in report})
    except Exception as exc:  # noqa: BLE001 - one case that cannot be counted must not stop the folder
        return CaseResult(job.case, error=str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
    return CaseResult(job.case, report=report)


class _Done:
    """A finished in-process result with the interface of ``AsyncResult`` that the loop uses."""

    def __init__(self, value):
        self._value = value

    def ready(self) -> bool:
        return True

    def get(self, timeout=None):
        return self._value


class CountingPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` whose export workers also count each case (see the module docstring).

    Constructed and initialised like ``nnUNetPredictor`` (``initialize_from_trained_model_folder``);
    then :meth:`predict_and_count`. ``num_processes_preprocessing=0`` preprocesses in this process,
    ``num_processes_segmentation_export=0`` exports and counts in this process (nnU-Net's
    ``-npp 0 -nps 0`` sequential mode).

    Example:
        >>> predictor = CountingPredictor(tile_step_size=0.5, device=torch.device("cpu"))   # doctest: +SKIP
        >>> predictor.initialize_from_trained_model_folder(model_folder, (0,), "checkpoint_final.pth")  # doctest: +SKIP
        >>> [r.report["count"]["expected_count"] for r in predictor.predict_and_count(lists, outs, jobs)]  # doctest: +SKIP
    """

    _count_jobs: dict = {}

    def initialize_from_trained_model_folder(self, model_training_output_dir, use_folds,
                                             checkpoint_name: str = "checkpoint_final.pth"):
        """nnU-Net's initialisation, with the trainer class found by :func:`find_trainer_class`."""
        original = _nnunet_predict.recursive_find_trainer_class_by_name
        _nnunet_predict.recursive_find_trainer_class_by_name = find_trainer_class
        try:
            super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        finally:
            _nnunet_predict.recursive_find_trainer_class_by_name = original

    def predict_and_count(self, list_of_lists: List[List[str]], output_files_truncated: List[str], jobs: List[CountJob],
                          save_probabilities: bool = False, num_processes_preprocessing: int = 3,
                          num_processes_segmentation_export: int = 3,
                          folder_with_segs_from_prev_stage: Optional[str] = None) -> List[CaseResult]:
        """Predict, export and count the given cases (nnU-Net's ``predict_from_files`` on these lists).

        Args:
            list_of_lists: per case, its image files (``CASE_0000.nii.gz``, ...).
            output_files_truncated: per case, the output path without file ending.
            jobs: per case, its :class:`CountJob`.

        Returns:
            One :class:`CaseResult` per case, in the order given.
        """
        if not (len(list_of_lists) == len(output_files_truncated) == len(jobs)):
            raise ValueError("list_of_lists, output_files_truncated and jobs must have the same length")
        if not list_of_lists:
            return []
        self._count_jobs = dict(zip(output_files_truncated, jobs))
        try:
            results = self.predict_from_files(list_of_lists, list(output_files_truncated),
                                              save_probabilities=save_probabilities, overwrite=True,
                                              num_processes_preprocessing=num_processes_preprocessing,
                                              num_processes_segmentation_export=num_processes_segmentation_export,
                                              folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage)
        finally:
            self._count_jobs = {}
        by_case = {r.case: r for r in results or []}
        return [by_case.get(job.case, CaseResult(job.case, error="not predicted")) for job in jobs]

    # ------------------------------------------------------------------ nnU-Net's hooks
    def _internal_get_data_iterator_from_lists_of_filenames(self, input_list_of_lists, seg_from_prev_stage_files,
                                                            output_filenames_truncated, num_processes):
        if num_processes > 0:
            return super()._internal_get_data_iterator_from_lists_of_filenames(
                input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated, num_processes)
        return self._preprocess_in_process(input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated)

    def _preprocess_in_process(self, lists, segs, ofiles):
        """What nnU-Net's preprocessing workers yield, computed in this process (``-npp 0``)."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing)
        for i, files in enumerate(lists):
            seg_file = segs[i] if segs is not None else None
            data, seg, properties = preprocessor.run_case(files, seg_file, self.plans_manager,
                                                          self.configuration_manager, self.dataset_json)
            if seg_file is not None:
                onehot = convert_labelmap_to_one_hot(seg[0], self.label_manager.foreground_labels, data.dtype)
                data = np.vstack((data, onehot))
            yield {"data": torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format),
                   "data_properties": properties, "ofile": ofiles[i] if ofiles is not None else None}

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 3):
        """nnU-Net's loop (network in this process, export in a spawn pool, at most 2 cases queued per
        worker), with :func:`export_and_count` as the export; ``0`` processes: export here."""
        if not self._count_jobs:
            return super().predict_from_data_iterator(data_iterator, save_probabilities,
                                                      num_processes_segmentation_export)
        pool = (multiprocessing.get_context("spawn").Pool(num_processes_segmentation_export)
                if num_processes_segmentation_export > 0 else None)
        try:
            workers = list(pool._pool) if pool is not None else []
            pending = []
            for preprocessed in data_iterator:
                data = preprocessed["data"]
                if isinstance(data, str):  # as nnU-Net: a large case handed over as a .npy file
                    path = data
                    data = torch.from_numpy(np.load(path))
                    os.remove(path)
                ofile = preprocessed["ofile"]
                job = self._count_jobs[ofile]
                print(f"\nPredicting {os.path.basename(ofile)}:")
                if pool is not None:
                    while check_workers_alive_and_busy(pool, workers, pending, allowed_num_queued=2):
                        time.sleep(0.1)
                t0 = time.perf_counter()
                prediction = self.predict_logits_from_preprocessed_data(data).cpu().detach().numpy()
                job.predict_s = time.perf_counter() - t0
                args = (prediction, preprocessed["data_properties"], self.configuration_manager, self.plans_manager,
                        self.dataset_json, ofile, save_probabilities, job)
                del prediction
                if pool is not None:
                    pending.append(pool.apply_async(export_and_count, args))
                else:
                    pending.append(_Done(export_and_count(*args)))
                del args
                print(f"done with {os.path.basename(ofile)}")
            results = []
            for item in pending:
                while True:
                    if pool is not None and not all(w.is_alive() for w in workers):
                        raise RuntimeError("Segmentation export worker died. It was likely killed by your OS because "
                                           "of insufficient available CPU RAM.")
                    try:
                        results.append(item.get(timeout=0.1))
                        break
                    except multiprocessing.TimeoutError:
                        pass
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        if isinstance(data_iterator, MultiThreadedAugmenter):
            data_iterator._finish()
        compute_gaussian.cache_clear()
        empty_cache(self.device)
        return results
