"""Online methods: loops that train on the policy's own samples, as thin users of the driver."""
