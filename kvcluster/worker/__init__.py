"""What both worker roles share: the node (model runner, kvstore, KV-event publisher) and the
embedded event relay. Imports the foundation, kvstore and router; never the composition layer."""
