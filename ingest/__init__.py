"""sclstore subpackage."""
