"""Privacy audit of a finished run, without trusting the coordinating server.

* :mod:`.verify` -- ``fedcare audit verify``: every audit log's hash chain and signatures,
  and the cross-checks between the server's and the sites' logs.
* :mod:`.epsilon` -- each site's ε recomputed with an independent accountant (PLD).
* :mod:`.attacks` -- ``fedcare audit attack``: membership inference and the one-run canary
  audit.
* :mod:`.report` -- ``fedcare audit report``: one self-contained HTML page.
* :mod:`.findings` -- what each step finds, as frozen models (the contract between them).

Submodules are imported where used (the attacks import torch).
"""
