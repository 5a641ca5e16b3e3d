"""What people look at: the study report and the plots logged to MLflow (the report lands with
the tuning issue; today the study's tables are `saferay show` and the MLflow UI)."""
