"""rewardflow: post-train flow-matching image generators against rewards."""

__version__ = "0.1.0"
