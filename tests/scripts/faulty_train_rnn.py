"""examples/train_rnn.py with the fault injection of faulty_train_lm.py (FAULT, FAULT_RANK,
FAULT_STEP: e.g. rank 1 SIGKILLs itself when it logs step 8, on the first attempt only)."""
import sys

import faulty_train_lm  # noqa: F401 - installs the fault (and puts examples/ on the path)
import train_rnn  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_rnn.cli())
