"""Fixtures for the deployment tests (helpers live in deploy_helpers.py)."""

from __future__ import annotations

import pytest

from tests.deploy.deploy_helpers import Rendered, kustomizations, overlay_id, rendered_for


@pytest.fixture(params=kustomizations(), ids=overlay_id)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    """Each kustomization under deploy/kubernetes, rendered once per session."""
    return rendered_for(request.param)
