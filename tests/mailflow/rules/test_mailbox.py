from mailflow.rules import mailbox as mb


def test_append_is_idempotent_and_lists_newest_first():
    table: dict = {}
    for i in range(150):
        assert mb.append(table, "a@x.test", "inbox", f"id{i:03d}", {"id": f"id{i:03d}"})
    assert not mb.append(table, "a@x.test", "inbox", "id010", {"id": "id010"})
    ids, cursor, total = mb.list_ids(table, "a@x.test", "inbox", 50, None)
    assert total == 150
    assert ids[0] == "id149" and ids[-1] == "id100" and len(ids) == 50
    seen = list(ids)
    while cursor is not None:
        ids, cursor, _ = mb.list_ids(table, "a@x.test", "inbox", 50, cursor)
        seen += ids
    assert seen == [f"id{i:03d}" for i in range(149, -1, -1)]
    assert mb.list_ids(table, "a@x.test", "sent", 10, None) == ([], None, 0)


class Recording(dict):
    """A table that logs its writes in order, as a changelog does."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, object]] = []

    def __setitem__(self, key: str, value: object) -> None:
        self.log.append((key, value))
        super().__setitem__(key, value)


def test_a_crash_at_any_write_is_repaired_by_replaying_the_records():
    ids = [f"id{i:03d}" for i in range(130)]  # crosses two page boundaries
    full = Recording()
    for i in ids:
        mb.append(full, "a@x.test", "inbox", i, {"id": i})
    # The state a killed worker restores is a prefix of its changelog; the input
    # is then replayed from some committed offset at or before the crash.
    for cut in range(len(full.log) + 1):
        table: dict = {}
        for key, value in full.log[:cut]:
            table[key] = value
        done = sum(1 for key, _ in full.log[:cut] if key.startswith("p"))  # page: last write
        for i in ids[max(0, done - 3):]:
            mb.append(table, "a@x.test", "inbox", i, {"id": i})
        listed, cursor, total = mb.list_ids(table, "a@x.test", "inbox", 500, None)
        assert total == len(ids) and cursor is None, cut
        assert listed == ids[::-1], cut
        assert all(table[mb.meta_key("a@x.test", "inbox", i)]["pos"] == n
                   for n, i in enumerate(ids)), cut


def test_an_append_writes_two_records_and_a_third_only_when_a_page_starts():
    table = Recording()
    for i in range(mb.PAGE + 1):
        mb.append(table, "a@x.test", "inbox", f"id{i:03d}", {})
    kinds = [key[0] for key, _ in table.log]
    assert kinds.count("m") == mb.PAGE + 1 and kinds.count("p") == mb.PAGE + 1
    assert kinds.count("t") == 1 and table[mb.tail_key("a@x.test", "inbox")] == 1


def test_a_folder_of_the_old_layout_keeps_its_listing():
    # Written before the last-page key: a size key, and a torn page with one id past it.
    table: dict = {mb.head_key("a@x.test", "inbox"): 65}
    table[mb.page_key("a@x.test", "inbox", 0)] = [f"id{i:03d}" for i in range(64)]
    table[mb.page_key("a@x.test", "inbox", 1)] = ["id064", "torn"]
    for i in range(66):
        table[mb.meta_key("a@x.test", "inbox", f"id{i:03d}")] = {"pos": i}
    assert mb.list_ids(table, "a@x.test", "inbox", 3, None) == (["id064", "id063", "id062"], 62, 65)
    assert not mb.append(table, "a@x.test", "inbox", "id010", {})
    assert mb.append(table, "a@x.test", "inbox", "id065", {})
    assert table[mb.tail_key("a@x.test", "inbox")] == 1
    ids, _, total = mb.list_ids(table, "a@x.test", "inbox", 500, None)
    assert total == 66 and ids == [f"id{i:03d}" for i in range(65, -1, -1)]


def test_lru_evicts_and_invalidates():
    lru = mb.LRU(size=2)
    lru.put(("a", "inbox", 10, None), 1)
    lru.put(("b", "inbox", 10, None), 2)
    assert lru.get(("a", "inbox", 10, None)) == 1
    lru.put(("c", "inbox", 10, None), 3)
    assert lru.get(("b", "inbox", 10, None)) is None  # least recently used went
    lru.drop_prefix(("a", "inbox"))
    assert lru.get(("a", "inbox", 10, None)) is None
    assert lru.get(("c", "inbox", 10, None)) == 3


def test_parts_reads_text_html_and_attachments():
    raw = (b"From: a@x.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
           b"--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nJVBERg==\r\n--B--\r\n")
    p = mb.parts(raw)
    assert p["text"].strip() == "hello"
    assert p["attachments"] == [{"filename": "a.pdf", "content_type": "application/pdf", "size": 4}]
