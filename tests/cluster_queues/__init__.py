"""Three queues for the Redis Cluster tests, named so their hash tags ({mail}, {images},
{billing}) land on three different masters of a 3-master cluster (slots 4247, 9450, 12682):
the tests check it with CLUSTER KEYSLOT and CLUSTER SLOTS. They share the contract's tasks."""
