from __future__ import annotations

import pytest

from capsa.model.image_ref import InvalidImageReference, parse_image_reference


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.35", "docker.io/library/busybox:1.35"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("user/app:v1.2-rc_3", "docker.io/user/app:v1.2-rc_3"),
        ("127.0.0.1:5000/capsa/pause:3.9", "127.0.0.1:5000/capsa/pause:3.9"),
        ("localhost/app", "localhost/app:latest"),
        ("quay.io/a/b/c:tag", "quay.io/a/b/c:tag"),
        ("registry:5000/app", "registry:5000/app:latest"),
        (
            "busybox@sha256:" + "a" * 64,
            "docker.io/library/busybox@sha256:" + "a" * 64,
        ),
    ],
)
def test_valid_references_are_normalised(text: str, normalised: str) -> None:
    assert str(parse_image_reference(text)) == normalised


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "non-empty"),
        (" busybox", "surrounding spaces"),
        ("BusyBox", "'BusyBox' is not a valid repository name component"),
        ("busy box", "not a valid repository name component"),
        ("busybox:", "not a valid tag"),
        ("busybox:-bad", "not a valid tag"),
        ("busybox@sha256:xyz", "not a valid digest"),
        ("a//b", "not a valid repository name component"),
        ("bad_host-.io/app", "not a valid registry host"),
        ("x" * 300, "longer than"),
    ],
)
def test_invalid_references_say_why(text: str, reason: str) -> None:
    with pytest.raises(InvalidImageReference, match=reason.replace("(", r"\(")):
        parse_image_reference(text)
