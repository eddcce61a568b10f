"""scripts/check_links.py, which `make lint` runs on README.md and docs/*.md."""

from __future__ import annotations

from scripts import check_links


def test_headings_get_githubs_ids():
    assert check_links.slug("Deprecated: `job_id` and `job_ids`") == "deprecated-job_id-and-job_ids"
    assert check_links.slug("Live progress (Server-Sent Events)") == "live-progress-server-sent-events"
    assert check_links.slug("Queueing locks and retries") == "queueing-locks-and-retries"
    assert check_links.slug("See [the API](using.md)") == "see-the-api"


def test_broken_files_and_anchors_are_reported_and_code_is_not_read(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#twice-1) [self](#page) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [no anchor](other.md#thrice) [no self anchor](#nowhere)\n"
        "`[in code](missing.md)`\n\n"
        "```\n[in a block](missing.md)\n```\n"
    )
    problems = check_links.broken_links(page)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing.md: no such file",
        "other.md#thrice: no heading #thrice in "
        + str(check_links.os.path.relpath(tmp_path / "other.md", check_links.BASE_DIR)),
        "#nowhere: no heading #nowhere in " + str(check_links.os.path.relpath(page, check_links.BASE_DIR)),
    ]


def test_the_docs_have_no_broken_link():
    assert check_links.main([]) == 0
