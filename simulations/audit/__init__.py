"""Privacy audit of a finished run, without trusting the coordinating server.

* :mod:`.verify` -- every audit log's hash chain and signatures, and the cross-checks
  between the server's and the sites' logs; :mod:`.verify_cli` -- ``fedcare audit verify``.
* :mod:`.epsilon` -- each site's ε recomputed with an independent accountant (PLD).
* :mod:`.attacks` -- ``fedcare audit attack``: membership inference and the one-run canary
  audit.
* :mod:`.report` -- ``fedcare audit report``: one self-contained HTML page; its verdict
  (:mod:`.report_verdict`), page (:mod:`.report_html`), loading (:mod:`.report_load`) and
  number format (:mod:`.report_format`) each in its own module.
* :mod:`.findings` -- what each step finds, as frozen models (the contract between them).
* :mod:`.model_card` -- ``fedcare report model``: the run's model card, one self-contained
  HTML page (:mod:`.model_card_cli`); the audit report links to it.

Submodules are imported where used (the attacks import torch).
"""
