"""Pure decisions: mail rules, the retry ladder, mailboxes, bounce classes, MIME parts, unsubscribe links. No I/O."""
