"""TFDS builders (array_record) for TL;DR SFT, TL;DR human comparisons and Anthropic HH-RLHF.

===================================  =====================  ==================================
builder                              splits                 features (all text is str/bytes)
===================================  =====================  ==================================
``tldr_sft`` (`TldrSft`)             train, valid, test     id, subreddit, title, post, summary
``tldr_comparisons``                 train, valid1, valid2  id, subreddit, title, post,
(`TldrComparisons`)                                         summary_{0,1}, policy_{0,1},
                                                            note_{0,1}, choice (int32, 0/1),
                                                            worker, batch, extra (JSON text)
``hh_rlhf/<subset>`` (`HhRlhf`)      train, test            prompt, chosen, rejected
===================================  =====================  ==================================

``tldr_sft`` is OpenAI's filtered Reddit TL;DR (``tldr_3_filtered``). ``tldr_comparisons``
is the human comparisons of "Learning to summarize from human feedback", split by each
record's upstream ``split`` field; records on CNN/DM articles (``info`` has ``article``
instead of ``post``, e.g. all of ``batch0_cnndm``) are dropped, so only TL;DR posts remain.
All comparison files are held in memory while grouping by split (a few hundred MB).
``hh_rlhf`` has one config per subset (`HH_SUBSETS`); ``prompt`` is the dialogue up to and
including the last ``"\\n\\nAssistant:"`` and chosen/rejected are the final responses
(see `validate.parse_hh_pair`).

Where files come from: each upstream file is read from ``manual_dir`` if it is there under
its upstream name (``train.jsonl``, ``batch3.json``, ``helpful-base/train.jsonl.gz``, ...),
and otherwise downloaded from its public URL by the TFDS download manager::

    builder = HhRlhf(config="helpful-base", data_dir=data_dir, on_bad_record="skip")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    source = tfds.data_source("hh_rlhf/helpful-base", split="train", data_dir=data_dir)

or `prepare`. Bad records (see `validate`) abort the build with a `DataError` naming file
and line (``on_bad_record="raise"``, the default: nothing is published), or are skipped:
``builder.skipped_records`` lists them, and their count per file is saved in the dataset's
``info.metadata["skipped_records"]``.

Working without TensorFlow (tensorflow-datasets 4.9.10): building and reading work, with
``file_format="array_record"`` (our default) and reading through ``tfds.data_source`` /
``builder.as_data_source`` only (``tfds.load``/``as_dataset`` import TF). Text features come
back as UTF-8 ``bytes``. ``self.dataset_info_from_configs`` is not used because it reads
metadata files next to the builder module; ``_info`` builds ``tfds.core.DatasetInfo``
directly. ``dl_manager.manual_dir`` raises when the directory is absent or empty, which
here means "download everything".
"""
from __future__ import annotations

import collections
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from p3o_jax.data import validate

TLDR_SFT_URL = ("https://openaipublic.blob.core.windows.net/summarize-from-feedback/datasets/"
                "tldr_3_filtered/{split}.jsonl")
TLDR_SFT_SPLITS = ("train", "valid", "test")
COMPARISONS_URL = ("https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/"
                   "comparisons/{file}")
COMPARISON_FILES = tuple(
    [f"batch{i}.json" for i in range(3, 21)]
    + ["batch22.json", "batch0_cnndm.json", "cnndm0.json", "cnndm2.json", "edit_b2_eval_test.json"])
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{file}"
HH_SUBSETS = ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")
HH_SPLITS = ("train", "test")

_SUMMARIZE_CITATION = """@inproceedings{stiennon2020learning,
  title={Learning to summarize from human feedback},
  author={Stiennon, Nisan and Ouyang, Long and Wu, Jeff and Ziegler, Daniel M. and Lowe, Ryan
          and Voss, Chelsea and Radford, Alec and Amodei, Dario and Christiano, Paul},
  booktitle={NeurIPS}, year={2020}}"""
_HH_CITATION = """@article{bai2022training,
  title={Training a Helpful and Harmless Assistant with Reinforcement Learning from Human
         Feedback},
  author={Bai, Yuntao and others}, journal={arXiv:2204.05862}, year={2022}}"""


class _UpstreamJsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: array_record output, manual_dir-or-download, bad-record policy."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: place the upstream files in manual_dir under their upstream names "
        "(see p3o_jax.data.builders); files not found there are downloaded.")

    def __init__(self, *, on_bad_record: validate.OnBadRecord = "raise", file_format=None,
                 **kwargs):
        if on_bad_record not in validate.ON_BAD_RECORD:
            raise ValueError(
                f"on_bad_record must be one of {validate.ON_BAD_RECORD}, got {on_bad_record!r}")
        self.on_bad_record = on_bad_record
        self.skipped_records: list[validate.DataError] = []
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _dataset_info(self, features: dict, description: str, homepage: str, citation: str):
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict(features),
            homepage=homepage,
            citation=citation,
            metadata=tfds.core.MetadataDict(),
        )

    def _fetch(self, dl_manager, urls: dict[str, str]) -> dict[str, epath.Path]:
        """Upstream name -> local path, from manual_dir where present, else downloaded."""
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # manual_dir absent or empty
            manual_dir = None
        paths = {name: manual_dir / name for name in urls
                 if manual_dir is not None and (manual_dir / name).exists()}
        missing = {name: url for name, url in urls.items() if name not in paths}
        if missing:
            logging.info("Downloading %d upstream files: %s", len(missing), sorted(missing))
            paths.update(dl_manager.download(missing))
        return paths

    def _read(self, path: epath.Path, parse):
        """`validate.read_jsonl` with this builder's bad-record policy; skips are recorded."""
        skipped_before = len(self.skipped_records)
        yield from validate.read_jsonl(
            path, parse, on_bad_record=self.on_bad_record, skipped=self.skipped_records)
        new = self.skipped_records[skipped_before:]
        if new:
            logging.warning("Skipped %d bad records in %s, first: %s", len(new), path, new[0])
            counts = self.info.metadata.setdefault("skipped_records", {})
            counts[os.fspath(path)] = counts.get(os.fspath(path), 0) + len(new)


class TldrSft(_UpstreamJsonlBuilder):
    """OpenAI's filtered Reddit TL;DR (tldr_3_filtered): post + reference summary."""

    def _info(self):
        return self._dataset_info(
            {key: tfds.features.Text() for key in ("id", "subreddit", "title", "post", "summary")},
            description=self.__doc__,
            homepage="https://github.com/openai/summarize-from-feedback",
            citation=_SUMMARIZE_CITATION,
        )

    def _split_generators(self, dl_manager):
        files = {f"{split}.jsonl": TLDR_SFT_URL.format(split=split) for split in TLDR_SFT_SPLITS}
        paths = self._fetch(dl_manager, files)
        return {split: self._generate_examples(paths[f"{split}.jsonl"])
                for split in TLDR_SFT_SPLITS}

    def _generate_examples(self, path):
        for line, record in self._read(path, validate.parse_tldr_post):
            yield line, record


class TldrComparisons(_UpstreamJsonlBuilder):
    """Human comparisons of two TL;DR summaries of a Reddit post (Stiennon et al. 2020)."""

    def _info(self):
        text = {key: tfds.features.Text() for key in (
            "id", "subreddit", "title", "post", "summary_0", "summary_1", "policy_0", "policy_1",
            "note_0", "note_1", "worker", "batch", "extra")}
        return self._dataset_info(
            {**text, "choice": np.int32},
            description=self.__doc__,
            homepage="https://github.com/openai/summarize-from-feedback",
            citation=_SUMMARIZE_CITATION,
        )

    def _split_generators(self, dl_manager):
        urls = {name: COMPARISONS_URL.format(file=name) for name in COMPARISON_FILES}
        paths = self._fetch(dl_manager, urls)
        by_split = collections.defaultdict(list)
        for name in COMPARISON_FILES:
            for line, record in self._read(paths[name], validate.parse_tldr_comparison):
                by_split[record.pop("split")].append((f"{name}:{line}", record))
        return {split: self._generate_examples(by_split[split])
                for split in validate.COMPARISON_SPLITS}

    def _generate_examples(self, examples):
        yield from examples


class HhRlhf(_UpstreamJsonlBuilder):
    """Anthropic HH-RLHF preference pairs: shared dialogue prompt, chosen and rejected reply."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=subset, description=f"The {subset} subset.")
                       for subset in HH_SUBSETS]

    def _info(self):
        return self._dataset_info(
            {key: tfds.features.Text() for key in ("prompt", "chosen", "rejected")},
            description=self.__doc__,
            homepage="https://github.com/anthropics/hh-rlhf",
            citation=_HH_CITATION,
        )

    def _split_generators(self, dl_manager):
        names = {split: f"{self.builder_config.name}/{split}.jsonl.gz" for split in HH_SPLITS}
        paths = self._fetch(dl_manager, {name: HH_URL.format(file=name) for name in names.values()})
        return {split: self._generate_examples(paths[names[split]]) for split in HH_SPLITS}

    def _generate_examples(self, path):
        for line, record in self._read(path, validate.parse_hh_pair):
            yield line, record


def prepare(
    name: str,
    data_dir: str | os.PathLike,
    *,
    manual_dir: str | os.PathLike | None = None,
    on_bad_record: validate.OnBadRecord = "raise",
) -> _UpstreamJsonlBuilder:
    """Builds dataset ``name`` ("tldr_sft", "tldr_comparisons", "hh_rlhf/helpful-base", ...)
    into ``data_dir`` (a no-op if already built) and returns its builder."""
    builder = tfds.builder(name, data_dir=data_dir, on_bad_record=on_bad_record)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
