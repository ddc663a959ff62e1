"""The constants every package shares (no torch here: the command's argument parsing reads
them before anything heavy is imported)."""

#: The label the losses skip (PyTorch's and HF's convention): every op, model, selector
#: and the packer use this one constant.
IGNORE_INDEX = -100

#: The reductions of the weighted losses (ops, models, the HF patch): per token ("none"),
#: per sample ("sample", the weighted mean over each row's tokens), "sum" and "mean".
LOSS_REDUCTIONS = ("none", "sample", "sum", "mean")

#: How the scores of a document's samples become the document's score (packing, select).
DOCUMENT_REDUCTIONS = ("mean", "token_mean", "max", "min", "sum")
