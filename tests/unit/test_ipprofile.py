from acme_registry.ipprofile import profile_problem


def test_shortlived_offered_is_fine():
    assert profile_problem({"meta": {"profiles": {"classic": "", "shortlived": ""}}}) is None


def test_no_shortlived_names_acme_profile_and_what_is_offered():
    problem = profile_problem({"meta": {"profiles": {"classic": "", "tlsserver": ""}}})
    assert problem is not None
    assert "ACME_PROFILE" in problem and "classic, tlsserver" in problem


def test_a_directory_without_profiles():
    problem = profile_problem({"newOrder": "https://ca.test/order"})
    assert problem is not None and "offers: none" in problem
