"""Accuracy: the share of samples predicted right; with config_name="multilabel", right on every label (subset
accuracy)."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


class Accuracy(evaluate.Metric):
    def _info(self):
        label = datasets.Value("int64")
        if self.config_name == "multilabel":
            label = datasets.Sequence(label)
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: class indices, or 0/1 per label with 'multilabel'.",
            features=datasets.Features({"predictions": label, "references": label}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(accuracy_score(references, predictions))}
