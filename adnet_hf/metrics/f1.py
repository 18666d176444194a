"""F1 of the positive class (1) of a two-class task, as GLUE reports it for MRPC and QQP."""

import datasets
import evaluate
from sklearn.metrics import f1_score


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: class indices 0 or 1.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"f1": float(f1_score(references, predictions, pos_label=1, average="binary"))}
