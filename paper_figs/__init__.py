"""Figure scripts: run directories / tables -> PDF + PNG at paper column widths."""
