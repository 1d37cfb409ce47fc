"""Published figures a report may set beside its own, each tied to the data it was measured on.

A `Reference` belongs to one source (`Source.qa_reference`, `finding_reference`, `seg_reference`): the
report shows its values only in the rows of that source's data, and cites the work they come from. The
works are cited here once, in full, so the report and the README name the same papers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["CHILAMKURTHY_2018", "HSSAYENI_2020", "M3D_2024", "SEED_STUDY", "Reference", "Work"]


@dataclass(frozen=True)
class Work:
    """A publication the report cites.

    Args:
        short: the name captions use ("Chilamkurthy et al. 2018").
        full: the full citation (authors, title, venue, year, where to find it).
    """

    short: str
    full: str


@dataclass(frozen=True, eq=False)
class Reference:
    """Figures one work published on one source's data.

    Args:
        work: the publication.
        where: where in it the figures stand ("Table 1", "the abstract's findings"), "" if not recorded.
        what: what was measured on which data, in words (the caption's second half).
        values: metric or finding key -> value, as published (with the publication's rounding).
    """

    work: Work
    where: str
    what: str
    values: Mapping[str, float]

    def caption(self) -> str:
        """One sentence saying whose figures these are, where they stand and what they measure."""
        where = f", {self.where}" if self.where else ""
        return f"{self.work.short}{where} ({self.what})"


M3D_2024 = Work(
    "Bai et al. 2024",
    "Bai F, Du Y, Huang T, Meng MQ-H, Zhao B. M3D: Advancing 3D Medical Image Analysis with Multi-Modal "
    "Large Language Models. arXiv:2404.00578, 2024 (M3D-LaMed, M3D-Data, M3D-Bench).",
)
# The study whose brain-CT experiment m3d-lit reproduces. M3D's own paper reports no CQ500 or PhysioNet
# figures: the Table 1 values are this study's, measured with M3D's model.
SEED_STUDY = Work(
    "the brain-CT M3D-LaMed study",
    "The brain-CT study m3d-lit reproduces: M3D-LaMed (Bai et al. 2024, arXiv:2404.00578) fine-tuned with "
    "LoRA on question answering built from CQ500 and PhysioNet CT-ICH; its Table 1 gives BLEU-1..4, ROUGE "
    "and METEOR on each test set.",
)
CHILAMKURTHY_2018 = Work(
    "Chilamkurthy et al. 2018",
    "Chilamkurthy S, Ghosh R, Tanamala S, Biviji M, Campeau NG, Venugopal VK, Mahajan V, Rao P, Warier P. "
    "Deep learning algorithms for detection of critical findings in head CT scans: a retrospective study. "
    "Lancet 2018;392:2388-96 (the study that released CQ500).",
)
HSSAYENI_2020 = Work(
    "Hssayeni et al. 2020",
    "Hssayeni MD, Croock MS, Salman AD, Al-khafaji HF, Yahya ZA, Ghoraani B. Intracranial Hemorrhage "
    "Segmentation Using a Deep Convolutional Model. Data 2020;5(1):14. The data: Hssayeni M. Computed "
    "Tomography Images for Intracranial Hemorrhage Detection and Segmentation (version 1.3.1), PhysioNet "
    "2020, https://doi.org/10.13026/4nae-zg36.",
)
