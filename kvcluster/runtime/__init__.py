"""What both worker roles share: the task types and the node they run on."""
