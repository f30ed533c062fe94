"""What a session weighs on its tower, as both ends of a link count it."""

from broker.link import APPLICATIONS, session_weight


def test_a_session_that_may_get_video_weighs_the_video_weight_until_answered():
    assert session_weight("echo", 25, 500) == 1
    assert session_weight("demo", 25, 500) == 25
    assert {name for name, video in APPLICATIONS.items() if video} == {"demo"}


def test_a_session_never_weighs_more_than_a_whole_tower():
    # Alone, it always fits: a small capacity does not keep video sessions out.
    assert session_weight("demo", 25, 4) == 4
