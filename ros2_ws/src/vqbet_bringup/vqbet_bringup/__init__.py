"""vqbet_bringup: installs the top-level launch/ files and config/ parameter files into its share folder."""
