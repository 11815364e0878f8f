"""``warden eval``: golden sets run through Warden itself, scored, stored, compared.

- :mod:`proxy.eval.cases` — the case file schema (YAML or JSONL) and its validation;
- :mod:`proxy.eval.checks` — scoring one case's observed outcome, check by check;
- :mod:`proxy.eval.runner` — sending the cases through a Warden (in-process from a
  config, or a running one) and reading its decisions from the audit record;
- :mod:`proxy.eval.report` — the run file, ``compare`` and the JUnit / HTML reports;
- :mod:`proxy.eval.export` — cases from reviewers' feedback in the audit log;
- :mod:`proxy.eval.corpus`, :mod:`proxy.eval.obedient`, :mod:`proxy.eval.redteam` — the
  adversarial suite: AgentDojo's attacks, the obedient scripted model, the scenarios and goals;
- :mod:`proxy.eval.slo` — retrieval's objectives measured from the audit log.

An operator tool: nothing here runs on the data plane.
"""
