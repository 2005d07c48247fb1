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
instead of ``post``, e.g. all of ``batch0_cnndm``) are skipped, so only TL;DR posts remain.
All comparison files are held in memory while grouping by split (a few hundred MB).
``hh_rlhf`` has one config per subset (`HH_SUBSETS`); ``prompt`` is the longest dialogue
prefix shared by chosen and rejected that ends with ``"\\n\\nAssistant:"``, and chosen/rejected
are the rest of each dialogue: usually the final replies, possibly empty (see
`validate.parse_hh_pair`).

Where files come from: with a ``manual_dir``, every upstream file is read from it under its
upstream name (``train.jsonl``, ``batch3.json``, ``helpful-base/train.jsonl.gz``, ...) and
nothing is downloaded: the files it lacks are listed, with where to get them, in one
`UpstreamError` (`check_manual_dir`). Without one, each file is downloaded from its public
URL by the TFDS download manager; a failed download names the file and URL. Before
anything is read, a file that is empty or a Git LFS pointer (what a ``git clone`` of the
HH dataset repository gives without git-lfs) is an `UpstreamError` naming it::

    builder = HhRlhf(config="helpful-base", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    source = tfds.data_source("hh_rlhf/helpful-base", split="train", data_dir=data_dir)

or `prepare`. Corrupt records (see `validate`) abort the build with a `DataError` naming file
and line (``on_bad_record="raise"``, the default: nothing is published), or are skipped:
``builder.skipped_records`` lists them, and their count per file is saved in the dataset's
``info.metadata["skipped_records"]``. Well-formed records a dataset cannot use are skipped
and counted by reason (`validate.Skipped`). Each split's records read, kept and skipped
by reason make one line, kept in ``info.metadata["summary"]`` and printed by `prepare`; a
split left without records is an `UpstreamError` naming its files.

Working without TensorFlow (tensorflow-datasets 4.9.10): building and reading work, with
``file_format="array_record"`` (our default) and reading through ``tfds.data_source`` /
``builder.as_data_source`` only (``tfds.load``/``as_dataset`` import TF). Text features come
back as UTF-8 ``bytes``. ``self.dataset_info_from_configs`` is not used because it reads
metadata files next to the builder module; ``_info`` builds ``tfds.core.DatasetInfo``
directly. ``dl_manager.manual_dir`` raises when the directory is absent or empty, which
here means "download everything" (`prepare` checks a given ``manual_dir`` first).
"""
from __future__ import annotations

import collections
import os
import re
import sys
from collections.abc import Iterable, Iterator

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
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"

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
        "Optional: place every upstream file in manual_dir under its upstream name "
        "(see p3o_jax.data.builders); without manual_dir they are downloaded.")

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

    @property
    def dataset_name(self) -> str:
        """``"tldr_sft"``, ``"hh_rlhf/helpful-base"``, ...: what `prepare` and `upstream_files` take."""
        config = self.builder_config
        return f"{self.name}/{config.name}" if config else self.name

    def _fetch(self, dl_manager) -> dict[str, epath.Path]:
        """Upstream name -> local path of every file of `upstream_files`, all from manual_dir
        when there is one, else downloaded; each checked by `check_file`."""
        urls = upstream_files(self.dataset_name)
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # manual_dir absent or empty: download everything
            manual_dir = None
        if manual_dir is not None:
            missing = {name: url for name, url in urls.items() if not (manual_dir / name).exists()}
            if missing:
                raise missing_files_error(manual_dir, missing)
            paths = {name: manual_dir / name for name in urls}
        else:
            paths = {name: _download(dl_manager, name, url) for name, url in urls.items()}
        for name, path in paths.items():
            check_file(path, urls[name])
        return paths

    def _read(self, path: epath.Path, parse) -> Iterator[tuple[int, dict | validate.Skipped]]:
        """`validate.read_jsonl` with this builder's bad-record policy; skips are recorded."""
        skipped_before = len(self.skipped_records)
        yield from validate.read_jsonl(
            path, parse, on_bad_record=self.on_bad_record, skipped=self.skipped_records)
        new = self.skipped_records[skipped_before:]
        if new:
            logging.warning("Skipped %d bad records in %s, first: %s", len(new), path, new[0])
            counts = self.info.metadata.setdefault("skipped_records", {})
            counts[os.fspath(path)] = counts.get(os.fspath(path), 0) + len(new)

    def _counted(self, split: str, items: Iterable[tuple], where: str) -> Iterator[tuple]:
        """The kept ``(key, record)`` of ``items`` (``(key, record | Skipped)`` pairs, read
        from ``where``); once all are read, keeps the split's `validate.Counts` summary line
        in ``info.metadata["summary"]``. Raises `UpstreamError` if none is kept."""
        counts = validate.Counts()
        for key, record in items:
            counts.add(record)
            if not isinstance(record, validate.Skipped):
                yield key, record
        summary = counts.summary(f"{self.dataset_name} {split}")
        if not counts.kept:
            raise validate.UpstreamError(f"no usable records for {self.dataset_name} {split} "
                                         f"in {where} ({summary.partition(': ')[2]})")
        self.info.metadata.setdefault("summary", {})[split] = summary


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
        paths = self._fetch(dl_manager)
        return {split: self._generate_examples(split, paths[f"{split}.jsonl"])
                for split in TLDR_SFT_SPLITS}

    def _generate_examples(self, split, path):
        yield from self._counted(split, self._read(path, validate.parse_tldr_post), path)


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
        paths = self._fetch(dl_manager)
        by_split = collections.defaultdict(list)
        for name in COMPARISON_FILES:
            for line, record in self._read(paths[name], validate.parse_tldr_comparison):
                split = record.split if isinstance(record, validate.Skipped) else record.pop("split")
                by_split[split].append((f"{name}:{line}", record))
        unsplit = validate.Counts()  # corrupt records skipped: their split is unknown
        for _, record in by_split.pop(None, []):
            unsplit.add(record)
        if unsplit.read:
            self.info.metadata.setdefault("summary", {})["split unknown"] = unsplit.summary(
                f"{self.dataset_name} (split unknown)")
        where = f"the {len(paths)} comparison files in {os.path.dirname(paths[COMPARISON_FILES[0]])}"
        return {split: self._generate_examples(split, by_split[split], where)
                for split in validate.COMPARISON_SPLITS}

    def _generate_examples(self, split, examples, where):
        yield from self._counted(split, examples, where)


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
        paths = self._fetch(dl_manager)
        return {split: self._generate_examples(
                    split, paths[f"{self.builder_config.name}/{split}.jsonl.gz"])
                for split in HH_SPLITS}

    def _generate_examples(self, split, path):
        yield from self._counted(split, self._read(path, validate.parse_hh_pair), path)


def upstream_files(name: str) -> dict[str, str]:
    """Upstream file name -> public URL, for dataset ``name`` ("tldr_sft",
    "tldr_comparisons", "hh_rlhf/<subset>")."""
    if name == "tldr_sft":
        return {f"{split}.jsonl": TLDR_SFT_URL.format(split=split) for split in TLDR_SFT_SPLITS}
    if name == "tldr_comparisons":
        return {file: COMPARISONS_URL.format(file=file) for file in COMPARISON_FILES}
    family, _, subset = name.partition("/")
    if family != "hh_rlhf" or subset not in HH_SUBSETS:
        raise ValueError(f"unknown dataset {name!r}")
    files = [f"{subset}/{split}.jsonl.gz" for split in HH_SPLITS]
    return {file: HH_URL.format(file=file) for file in files}


def check_manual_dir(manual_dir: str | os.PathLike, names: Iterable[str]) -> None:
    """Raises one `UpstreamError` listing every upstream file of datasets ``names`` that
    ``manual_dir`` lacks (or saying that it is no directory)."""
    manual_dir = epath.Path(manual_dir)
    if not manual_dir.is_dir():
        raise validate.UpstreamError(f"manual_dir {manual_dir} is not a directory")
    missing = {file: url for name in names for file, url in upstream_files(name).items()
               if not (manual_dir / file).exists()}
    if missing:
        raise missing_files_error(manual_dir, missing)


def missing_files_error(manual_dir, missing: dict[str, str]) -> validate.UpstreamError:
    """``missing``: upstream name -> URL. One line: the names, then where to get them."""
    sources = collections.defaultdict(list)  # URL with "<name>" for the name -> names
    for file, url in missing.items():
        sources[url[: -len(file)] + "<name>"].append(file)
    where = " or ".join(
        template + (f" ({', '.join(files)})" if len(sources) > 1 else "")
        for template, files in sources.items())
    return validate.UpstreamError(
        f"manual_dir {manual_dir} lacks {len(missing)} upstream file(s): {', '.join(missing)}; "
        f"get each from {where} and save it as {manual_dir}/<name> (nothing is downloaded "
        f"while manual_dir is set; leave it unset to download everything)")


def check_file(path: epath.Path, url: str) -> None:
    """Raises `UpstreamError` if upstream file ``path`` (from ``url``) is empty or a Git LFS
    pointer (3 lines: ``version https://git-lfs.github.com/spec/v1``, ``oid sha256:...``,
    ``size N``)."""
    with epath.Path(path).open("rb") as f:
        head = f.read(1024)
    if not head:
        raise validate.UpstreamError(f"{path} is empty; the upstream file is not: get it again "
                                     f"from {url}")
    if head.startswith(LFS_POINTER):
        size = re.search(rb"^size (\d+)", head, re.MULTILINE)
        of = f" (to a file of {int(size.group(1))} bytes)" if size else ""
        raise validate.UpstreamError(
            f"{path} is a Git LFS pointer{of}, not the data: run `git lfs pull` in the git "
            f"clone it comes from, or download {url}")


def _download(dl_manager, name: str, url: str) -> epath.Path:
    try:
        return dl_manager.download({name: url})[name]
    except Exception as e:  # noqa: BLE001 -- whatever failed, say which file and what to do
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise validate.UpstreamError(
            f"could not download {name} from {url} ({type(e).__name__}: {why}); to build "
            f"offline, get the file elsewhere and set manual_dir to a folder holding it (and "
            f"the other upstream files) under that name") from None


def prepare(
    name: str,
    data_dir: str | os.PathLike,
    *,
    manual_dir: str | os.PathLike | None = None,
    on_bad_record: validate.OnBadRecord = "raise",
) -> _UpstreamJsonlBuilder:
    """Builds dataset ``name`` ("tldr_sft", "tldr_comparisons", "hh_rlhf/helpful-base", ...)
    into ``data_dir`` (a no-op if already built) and returns its builder. With
    ``manual_dir``, it must hold every upstream file (`check_manual_dir`). Prints each
    split's summary line once built."""
    builder = tfds.builder(name, data_dir=data_dir, on_bad_record=on_bad_record)
    if builder.is_prepared():
        return builder
    if manual_dir:
        check_manual_dir(manual_dir, [name])
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    for summary in builder.info.metadata.get("summary", {}).values():
        print(summary, file=sys.stderr)
    return builder
