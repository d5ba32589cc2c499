"""Design studies (`fusedit study STUDY.yaml`): train several designs under one recipe, score each and
compare them. A study drives training and evaluation both, so it sits above ``fusedit.train`` and
``fusedit.eval``, which never import it.

- ``file``: reads and checks a study file (``load_study``): every design's config resolved and validated
  before anything trains, and what differs between the designs.
- ``run``: runs a study and writes its report (``run_study``, ``describe_study``, ``markdown_report``).
"""
